//! Compute jobs over HTTP: public reads of the jobs in finalized state (a job, the open ones and
//! the recent ones, the providers), what this node's provider did with a job (why it declined,
//! where its run is), and — to the job's tenant only, on a signed request — the output and log
//! of this node's run. Reads of ledger state answer 503 `ledger_stalled` rather than a stale
//! view, like the other reads of current state.

use crate::api::{ApiState, Caller, error};
use archipel_ledger::Hash;
use archipel_market::{Job, Provider};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most open jobs `GET /v1/jobs` lists (the soonest due).
pub const MAX_LISTED_OPEN: usize = 500;

/// Public reads of jobs in finalized state (behind the stale-read guard).
pub fn ledger_routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/jobs", get(jobs)).route("/v1/jobs/{id}", get(job)).route("/v1/providers", get(providers))
}

/// What this node's provider did with a job (public).
pub fn provider_routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/jobs/{id}/declined", get(declined)).route("/v1/jobs/{id}/run", get(run))
}

/// A run's files, to the job's tenant (signed).
pub fn tenant_routes() -> Router<Arc<ApiState>> {
    Router::new().route("/v1/jobs/{id}/output", get(output)).route("/v1/jobs/{id}/log", get(log))
}

/// `GET /v1/jobs/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    /// The finalized height read.
    pub height: u64,
    /// Its block time.
    pub now_ms: u64,
    /// The job.
    pub job: Job,
}

/// `GET /v1/jobs`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobList {
    /// The finalized height read.
    pub height: u64,
    /// Its block time.
    pub now_ms: u64,
    /// Open jobs (the [`MAX_LISTED_OPEN`] soonest due).
    pub open: Vec<Job>,
    /// How many jobs are open.
    pub open_total: usize,
    /// The newest ended jobs, newest first (at most [`archipel_ledger::jobs::RECENT_ENDED`]).
    pub recent: Vec<Job>,
}

/// `GET /v1/providers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProviderList {
    /// The finalized height read.
    pub height: u64,
    /// Registered compute providers, with whether their lease is up.
    pub providers: Vec<ProviderView>,
}

/// One provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProviderView {
    /// As the market sees it.
    #[serde(flatten)]
    pub provider: Provider,
    /// Its name.
    pub name: String,
    /// Its API.
    pub api_url: String,
    /// Whether its lease is up.
    pub up: bool,
}

fn parse_id(id: &str) -> Result<Hash, Box<Response>> {
    id.parse::<Hash>().map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_job_id",
            format!("{id:?} is not a job id (64 hex digits, as `archipel job submit` prints)"),
        ))
    })
}

fn no_job(id: &Hash) -> Response {
    error(StatusCode::NOT_FOUND, "no_such_job", format!("no job {id} in finalized state (see `archipel market`)"))
}

async fn job(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match s.chain.with_state(|st| {
        st.job(&id).map(|job| JobView { height: st.chain().height, now_ms: st.chain().timestamp_ms, job })
    }) {
        Some(v) => Json(v).into_response(),
        None => no_job(&id),
    }
}

async fn jobs(State(s): State<Arc<ApiState>>) -> Response {
    // Bounded: the soonest due of the open jobs, and the index of the newest ended ones.
    let view = s.chain.with_state(|st| {
        let open: Vec<Job> = st.open_jobs().take(MAX_LISTED_OPEN).filter_map(|(_, id)| st.job(&id)).collect();
        let recent: Vec<Job> = st.recent_ended_jobs().filter_map(|(_, id)| st.job(&id)).collect();
        JobList {
            height: st.chain().height,
            now_ms: st.chain().timestamp_ms,
            open,
            open_total: st.open_job_count(),
            recent,
        }
    });
    Json(view).into_response()
}

async fn providers(State(s): State<Arc<ApiState>>) -> Response {
    let view = s.chain.with_state(|st| ProviderList {
        height: st.chain().height,
        providers: st
            .providers()
            .into_iter()
            .filter_map(|p| {
                let d = &st.nodes().get(&p.node)?.descriptor.descriptor;
                Some(ProviderView {
                    name: d.name.clone(),
                    api_url: format!("http://{}", d.api_address),
                    up: st.lease_status(&p.node) == archipel_ledger::LeaseStatus::Up,
                    provider: p,
                })
            })
            .collect(),
    });
    Json(view).into_response()
}

fn book(s: &ApiState) -> Result<&crate::provider::ProviderBook, Box<Response>> {
    s.provider.as_deref().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "not_a_provider",
            "this node has no compute role: ask a provider (see `archipel market`)",
        ))
    })
}

/// The job id in the path and this node's provider book.
fn provider_job<'a>(s: &'a ApiState, id: &str) -> Result<(Hash, &'a crate::provider::ProviderBook), Box<Response>> {
    Ok((parse_id(id)?, book(s)?))
}

async fn declined(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let (id, book) = match provider_job(&s, &id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    match book.declined(&id) {
        Some(d) => Json(d).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_declined", format!("this provider did not decline job {id}")),
    }
}

async fn run(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let (id, book) = match provider_job(&s, &id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    // Never the outcome: a provider that read another's result before the reveal could seal
    // the same one without running the job.
    match book.run(&id) {
        Some(r) => Json(crate::provider::RunView::of(&r)).into_response(),
        None => error(StatusCode::NOT_FOUND, "no_run", format!("this provider has no run of job {id}")),
    }
}

/// The file `name` of this node's run of job `id`, to its tenant.
async fn run_file(s: &ApiState, id: &str, caller: &Caller, name: &str) -> Response {
    let (id, book) = match provider_job(s, id) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let Some(run) = book.run(&id) else {
        return error(StatusCode::NOT_FOUND, "no_run", format!("this provider has no run of job {id}"));
    };
    if run.tenant != caller.0 {
        return error(
            StatusCode::FORBIDDEN,
            "not_your_job",
            format!("job {id} belongs to {}: only its tenant reads its {name}", run.tenant.short()),
        );
    }
    if !matches!(run.phase, crate::provider::RunPhase::Done { .. }) {
        return error(StatusCode::CONFLICT, "not_done", format!("this provider's run of job {id} has not ended"));
    }
    // Streamed: an output may be as large as the job's output limit.
    match tokio::fs::File::open(book.job_dir(&id).join(name)).await {
        Ok(file) => axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response(),
        Err(e) => error(StatusCode::GONE, "gone", format!("the {name} of job {id} is no longer kept here ({e})")),
    }
}

async fn output(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    run_file(&s, &id, &caller, "output").await
}

async fn log(State(s): State<Arc<ApiState>>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Response {
    run_file(&s, &id, &caller, "log").await
}
