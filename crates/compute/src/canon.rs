//! Canonical NaNs for redundant jobs at a fraction of the cost of canonicalizing every float
//! operation.
//!
//! Redundant runs of a job (N > 1) are compared byte for byte, so the same module and inputs must
//! give the same output on every provider. WebAssembly is deterministic except for the bits of a
//! NaN that an arithmetic operation produces (x86 and ARM differ in sign and payload); loads,
//! stores, constants, `neg`, `abs`, `copysign` and reinterpretations keep bits exactly. Wasmtime
//! can make the result of every arithmetic float operation the canonical NaN when it is a NaN
//! (`cranelift_nan_canonicalization`), which costs ~3–5× on tight float loops (measured:
//! `cargo xtask bench wasm`).
//!
//! [`rewrite`] gives the same observable results more cheaply: it makes an arithmetic result
//! canonical (`x == x ? x : nan`, a compare and a select, with the bits Cranelift uses) unless the
//! instructions that follow, within the same straight-line stretch, feed that result straight into
//! another arithmetic operation, a comparison, a float-to-integer conversion, `drop`, or a local
//! whose bits are never seen (every read of it goes to one of those: [`blind_locals`]). Those give the same
//! answer for every NaN (arithmetic turns a NaN into a NaN — made canonical itself further on —,
//! comparisons are false, conversions trap or saturate alike), so the bits of the intermediate
//! NaN can never be seen. An expression such as `x * x - y * y + c` then pays one select, not four.
//! Anything else that takes the value (a local, a store, a call, `copysign`, control flow, an
//! instruction this module does not model) gets the canonical NaN, as with Cranelift's option.
//! So a rewritten module is observably the module run with Cranelift's canonicalization: providers
//! using either agree.
//!
//! A module using SIMD, or one the rewrite cannot validate, gets `None`: the caller then uses
//! Cranelift's canonicalization of every operation. The rewritten module is validated again
//! before it is returned, and refused (`None`) if it grew past [`MAX_GROWTH`] times its size.

use std::collections::BTreeSet;
use wasm_encoder::reencode::{Error as ReencodeError, Reencode};
use wasm_encoder::{Function, Ieee32, Ieee64, Instruction, ValType};
use wasmparser::{CompositeInnerType, Operator, Parser, Payload, Validator, WasmFeatures};

/// The canonical f32 NaN (what Cranelift's canonicalization produces).
pub const CANONICAL_F32: u32 = 0x7fc0_0000;
/// The canonical f64 NaN.
pub const CANONICAL_F64: u64 = 0x7ff8_0000_0000_0000;

/// The features a module may use to be rewritten: WebAssembly's defaults without SIMD.
fn features() -> WasmFeatures {
    WasmFeatures::default() - WasmFeatures::SIMD - WasmFeatures::RELAXED_SIMD
}

/// How much bigger than the module a rewritten one may be (a select is 13 to 17 bytes; a module
/// made of nothing but arithmetic could grow more): beyond it, the caller canonicalizes every
/// operation instead, so the compiler's input stays bounded by the module's.
pub const MAX_GROWTH: usize = 4;

/// How far past an arithmetic result the rewrite looks for the instruction that takes it.
const LOOKAHEAD: usize = 64;

/// The module to compile for a run, and whether Cranelift must canonicalize every float operation
/// too: `module` as it is when NaNs need not be canonical; [`rewrite`]'s module when it has one;
/// else `module` as it is, with Cranelift's canonicalization.
pub fn prepare(module: Vec<u8>, canonical_nans: bool) -> (Vec<u8>, bool) {
    if !canonical_nans {
        return (module, false);
    }
    match rewrite(&module) {
        Some(rewritten) => (rewritten, false),
        None => (module, true),
    }
}

/// `module` (binary or text) rewritten so that every arithmetic NaN that can be observed is
/// canonical (see the module docs), or `None` when it uses SIMD, is not valid, or cannot be
/// rewritten within [`MAX_GROWTH`]: the caller then canonicalizes every float operation instead.
pub fn rewrite(module: &[u8]) -> Option<Vec<u8>> {
    let bytes = wat::parse_bytes(module).ok()?;
    Validator::new_with_features(features()).validate_all(&bytes).ok()?;
    let params = param_counts(&bytes)?;
    let mut rewriter = Rewriter { params, next: 0 };
    let mut out = wasm_encoder::Module::new();
    rewriter.parse_core_module(&mut out, Parser::new(0), &bytes).ok()?;
    let out = out.finish();
    if out.len() > bytes.len().saturating_mul(MAX_GROWTH) {
        return None;
    }
    Validator::new_with_features(features()).validate_all(&out).ok()?;
    Some(out)
}

/// The number of parameters of each function the module defines, in order.
fn param_counts(bytes: &[u8]) -> Option<Vec<u32>> {
    let mut types = Vec::new();
    let mut params = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.ok()? {
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub in group.ok()?.into_types() {
                        // Non-function types still take an index.
                        let n = match &sub.composite_type.inner {
                            CompositeInnerType::Func(f) => f.params().len(),
                            _ => 0,
                        };
                        types.push(u32::try_from(n).ok()?);
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader {
                    params.push(*types.get(usize::try_from(ty.ok()?).ok()?)?);
                }
            }
            _ => {}
        }
    }
    Some(params)
}

/// Rewrites function bodies; everything else is copied as it is.
struct Rewriter {
    /// Parameters of each defined function.
    params: Vec<u32>,
    /// The next function body's index among the defined functions.
    next: usize,
}

/// The float type of an arithmetic result whose NaN bits depend on the machine, if `op` makes one.
fn arithmetic(op: &Operator<'_>) -> Option<ValType> {
    use Operator as O;
    match op {
        O::F32Add
        | O::F32Sub
        | O::F32Mul
        | O::F32Div
        | O::F32Min
        | O::F32Max
        | O::F32Sqrt
        | O::F32Ceil
        | O::F32Floor
        | O::F32Trunc
        | O::F32Nearest
        | O::F32DemoteF64 => Some(ValType::F32),
        O::F64Add
        | O::F64Sub
        | O::F64Mul
        | O::F64Div
        | O::F64Min
        | O::F64Max
        | O::F64Sqrt
        | O::F64Ceil
        | O::F64Floor
        | O::F64Trunc
        | O::F64Nearest
        | O::F64PromoteF32 => Some(ValType::F64),
        _ => None,
    }
}

/// What `op` does to the stack, for the few instructions the lookahead models: (values taken,
/// values pushed, whether its answer is the same for every NaN it takes). `None` for the rest.
fn effect(op: &Operator<'_>) -> Option<(usize, usize, bool)> {
    use Operator as O;
    if arithmetic(op).is_some() {
        let unary = matches!(
            op,
            O::F32Sqrt
                | O::F32Ceil
                | O::F32Floor
                | O::F32Trunc
                | O::F32Nearest
                | O::F32DemoteF64
                | O::F64Sqrt
                | O::F64Ceil
                | O::F64Floor
                | O::F64Trunc
                | O::F64Nearest
                | O::F64PromoteF32
        );
        return Some((if unary { 1 } else { 2 }, 1, true));
    }
    Some(match op {
        O::LocalGet { .. } | O::GlobalGet { .. } | O::I32Const { .. } | O::I64Const { .. } => (0, 1, false),
        // A local taking the value itself is decided by the caller; these are for values below it.
        O::LocalSet { .. } => (1, 0, false),
        O::LocalTee { .. } => (1, 1, false),
        O::Drop => (1, 0, true),
        O::F32Const { .. } | O::F64Const { .. } => (0, 1, false),
        O::F32Load { .. } | O::F64Load { .. } | O::I32Load { .. } | O::I64Load { .. } => (1, 1, false),
        // Comparisons: false (or true for `ne`) for every NaN.
        O::F32Eq | O::F32Ne | O::F32Lt | O::F32Gt | O::F32Le | O::F32Ge => (2, 1, true),
        O::F64Eq | O::F64Ne | O::F64Lt | O::F64Gt | O::F64Le | O::F64Ge => (2, 1, true),
        // To integers: a trap for every NaN, or 0 for every NaN.
        O::I32TruncF32S | O::I32TruncF32U | O::I32TruncF64S | O::I32TruncF64U => (1, 1, true),
        O::I64TruncF32S | O::I64TruncF32U | O::I64TruncF64S | O::I64TruncF64U => (1, 1, true),
        O::I32TruncSatF32S | O::I32TruncSatF32U | O::I32TruncSatF64S | O::I32TruncSatF64U => (1, 1, true),
        O::I64TruncSatF32S | O::I64TruncSatF32U | O::I64TruncSatF64S | O::I64TruncSatF64U => (1, 1, true),
        // Bit-exact: a NaN's bits go through (so a NaN taken here must already be canonical).
        O::F32Neg | O::F32Abs | O::F64Neg | O::F64Abs => (1, 1, false),
        O::F32Copysign | O::F64Copysign => (2, 1, false),
        O::F64ConvertI32S | O::F64ConvertI32U | O::F64ConvertI64S | O::F64ConvertI64U => (1, 1, false),
        O::F32ConvertI32S | O::F32ConvertI32U | O::F32ConvertI64S | O::F32ConvertI64U => (1, 1, false),
        _ => return None,
    })
}

/// Whether the value `ops[at]` pushed is taken, within the lookahead, by an instruction whose
/// answer is the same for every NaN, or kept in a local of `blind` (one whose bits are never
/// seen) — so its bits need not be canonical.
fn taken_by_nan_blind(ops: &[Operator<'_>], at: usize, blind: &BTreeSet<u32>) -> bool {
    // Values pushed above it.
    let mut above = 0usize;
    for op in ops.iter().skip(at + 1).take(LOOKAHEAD) {
        match op {
            Operator::LocalSet { local_index } if above == 0 => return blind.contains(local_index),
            // The value stays on the stack too: what takes it next decides.
            Operator::LocalTee { local_index } if above == 0 => {
                if blind.contains(local_index) {
                    continue;
                }
                return false;
            }
            _ => {}
        }
        let Some((takes, pushes, nan_blind)) = effect(op) else { return false };
        if takes > above {
            return nan_blind;
        }
        above = above - takes + pushes;
    }
    false
}

/// How many times [`blind_locals`] narrows its set before it gives up (and calls none blind).
const MAX_ROUNDS: usize = 16;

/// The function's locals whose bits are never seen: every `local.get` of one is taken by a
/// NaN-blind instruction or kept in another such local. Starts from all locals and drops those
/// read otherwise until nothing changes; none when that takes more than [`MAX_ROUNDS`].
fn blind_locals(ops: &[Operator<'_>], locals: u32) -> BTreeSet<u32> {
    let mut blind: BTreeSet<u32> = (0..locals).collect();
    for _ in 0..MAX_ROUNDS {
        let seen: Vec<u32> = ops
            .iter()
            .enumerate()
            .filter_map(|(at, op)| match op {
                Operator::LocalGet { local_index } if blind.contains(local_index) => {
                    (!taken_by_nan_blind(ops, at, &blind)).then_some(*local_index)
                }
                _ => None,
            })
            .collect();
        if seen.is_empty() {
            return blind;
        }
        for l in seen {
            blind.remove(&l);
        }
    }
    BTreeSet::new()
}

impl Reencode for Rewriter {
    type Error = String;

    fn parse_function_body(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        func: wasmparser::FunctionBody<'_>,
    ) -> Result<(), ReencodeError<String>> {
        let fail = |why: &str| ReencodeError::UserError(why.to_string());
        let params = *self.params.get(self.next).ok_or_else(|| fail("more bodies than functions"))?;
        self.next += 1;
        let mut locals = Vec::new();
        let mut count = u64::from(params);
        for pair in func.get_locals_reader()? {
            let (n, ty) = pair?;
            count += u64::from(n);
            locals.push((n, self.val_type(ty)?));
        }
        // Two scratch locals after the function's own: one f32, one f64.
        let f32_tmp = u32::try_from(count).map_err(|_| fail("too many locals"))?;
        let f64_tmp = f32_tmp.checked_add(1).ok_or_else(|| fail("too many locals"))?;
        locals.push((1, ValType::F32));
        locals.push((1, ValType::F64));
        let mut f = Function::new(locals);
        let mut reader = func.get_operators_reader()?;
        let mut ops = Vec::new();
        while !reader.eof() {
            ops.push(reader.read()?);
        }
        let blind = blind_locals(&ops, f32_tmp);
        for at in 0..ops.len() {
            let kind = arithmetic(&ops[at]).filter(|_| !taken_by_nan_blind(&ops, at, &blind));
            f.instruction(&self.instruction(ops[at].clone())?);
            // [x] → [x == x ? x : nan]
            match kind {
                Some(ValType::F32) => {
                    f.instruction(&Instruction::LocalTee(f32_tmp));
                    f.instruction(&Instruction::F32Const(Ieee32::new(CANONICAL_F32)));
                    f.instruction(&Instruction::LocalGet(f32_tmp));
                    f.instruction(&Instruction::LocalGet(f32_tmp));
                    f.instruction(&Instruction::F32Eq);
                    f.instruction(&Instruction::Select);
                }
                Some(_) => {
                    f.instruction(&Instruction::LocalTee(f64_tmp));
                    f.instruction(&Instruction::F64Const(Ieee64::new(CANONICAL_F64)));
                    f.instruction(&Instruction::LocalGet(f64_tmp));
                    f.instruction(&Instruction::LocalGet(f64_tmp));
                    f.instruction(&Instruction::F64Eq);
                    f.instruction(&Instruction::Select);
                }
                None => {}
            }
        }
        code.function(&f);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    fn ops(bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for payload in Parser::new(0).parse_all(bytes) {
            if let Payload::CodeSectionEntry(body) = payload.unwrap() {
                let mut r = body.get_operators_reader().unwrap();
                while !r.eof() {
                    out.push(format!("{:?}", r.read().unwrap()));
                }
            }
        }
        out
    }

    fn selects(bytes: &[u8]) -> usize {
        ops(bytes).iter().filter(|o| o.starts_with("Select")).count()
    }

    #[test]
    fn an_expression_pays_one_select_and_a_comparison_none() {
        let m = wat(r#"(module
            (func (param f64 f64 f64) (result f64)
              local.get 0  local.get 0  f64.mul  local.get 1  local.get 1  f64.mul  f64.sub  local.get 2  f64.add)
            (func (param f32 f32) (result i32)
              local.get 0  local.get 1  f32.mul  f32.sqrt  local.get 1  f32.lt))"#);
        let out = rewrite(&m).unwrap();
        assert_eq!(selects(&out), 1, "{:?}", ops(&out));
        let ops = ops(&out);
        let add = ops.iter().position(|o| o == "F64Add").unwrap();
        // Three params: the f64 scratch local is 4.
        assert_eq!(ops[add + 1], "LocalTee { local_index: 4 }", "the sum is made canonical: {ops:?}");
        // Everything else is as it was.
        let mut kept = ops.clone();
        kept.drain(add + 1..add + 7);
        assert_eq!(kept, super::tests::ops(&m));
    }

    #[test]
    fn a_value_taken_by_anything_not_modelled_is_made_canonical() {
        // A store, a local that is stored, copysign's sign, neg, a call's argument: each takes the
        // product as is.
        let m = wat(r#"(module (memory 1)
            (func $f (param f64))
            (func (param f64) (local f64)
              i32.const 0  local.get 0  local.get 0  f64.mul  f64.store
              local.get 0  local.get 0  f64.mul  local.set 1  i32.const 8  local.get 1  f64.store
              f64.const 1  local.get 0  local.get 0  f64.mul  f64.copysign  drop
              local.get 0  local.get 0  f64.mul  f64.neg  drop
              local.get 0  local.get 0  f64.mul  call $f))"#);
        assert_eq!(selects(&rewrite(&m).unwrap()), 5);
    }

    /// Runs the module's export `name` (no parameters) on `engine`: its results.
    fn call<R: wasmtime::WasmResults>(engine: &wasmtime::Engine, module: &[u8], name: &str) -> R {
        let module = wasmtime::Module::new(engine, module).unwrap();
        let mut store = wasmtime::Store::new(engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        instance.get_typed_func::<(), R>(&mut store, name).unwrap().call(&mut store, ()).unwrap()
    }

    type Bits = (u64, u64, i64, u32, u64, i64);

    // x86-64's own NaN bits are asserted first (other machines differ).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_rewrite_gives_what_cranelifts_canonicalization_gives_and_keeps_exact_bits_exact() {
        // Arithmetic NaNs: a NaN with a payload plus 1 (x86 keeps the payload), stored; 0/0
        // (x86: negative) reinterpreted; its sign given to 1 by copysign; an f32 0/0 stored. Then
        // bit-exact ones: the payload NaN copied by load and store, and the sign of a negative NaN
        // constant given to 1. Zeros come from memory so that nothing is folded when compiling.
        let m = wat(r#"(module (memory 1)
            (data (i32.const 64) "\01\00\00\00\00\00\f4\7f")
            (func (export "bits") (result i64 i64 i64 i32 i64 i64)
              (f64.store (i32.const 72) (f64.load (i32.const 64)))
              (f64.store (i32.const 64) (f64.add (f64.load (i32.const 64)) (f64.const 1)))
              (f32.store (i32.const 88) (f32.div (f32.load (i32.const 128)) (f32.load (i32.const 128))))
              (i64.load (i32.const 64))
              (i64.reinterpret_f64 (f64.div (f64.load (i32.const 128)) (f64.load (i32.const 128))))
              (i64.trunc_f64_s (f64.copysign (f64.const 1) (f64.div (f64.load (i32.const 128)) (f64.load (i32.const 128)))))
              (i32.load (i32.const 88))
              (i64.load (i32.const 72))
              (i64.trunc_f64_s (f64.copysign (f64.const 1) (f64.const -nan)))))"#);
        let plain = crate::child::engine(false).unwrap();
        let before: Bits = call(&plain, &m, "bits");
        assert_ne!(before.0, CANONICAL_F64, "x86 keeps the payload: {before:x?}");
        assert_ne!(before.1, CANONICAL_F64, "{before:x?}");
        assert_eq!(before.2, -1, "x86's 0/0 is negative");
        assert_ne!(before.3, CANONICAL_F32, "{before:x?}");
        let exact = (0x7ff4_0000_0000_0001, -1);
        assert_eq!((before.4, before.5), exact);
        let after: Bits = call(&plain, &rewrite(&m).unwrap(), "bits");
        assert_eq!(after, (CANONICAL_F64, CANONICAL_F64, 1, CANONICAL_F32, exact.0, exact.1));
        assert_eq!(after, call(&crate::child::engine(true).unwrap(), &m, "bits"), "as Cranelift's canonicalization");
    }

    #[test]
    fn a_module_without_arithmetic_is_left_as_it_was_but_for_two_locals() {
        let m = wat(r#"(module (memory 1) (func (param f64) (result f64)
            i32.const 0  local.get 0  f64.neg  f64.store  local.get 0  f64.abs))"#);
        let out = rewrite(&m).unwrap();
        assert_eq!(ops(&out), ops(&m));
        assert_eq!(
            rewrite(b"(module (func (param f64) (result f64) local.get 0 f64.sqrt))").map(|o| selects(&o)),
            Some(1),
            "text too"
        );
    }

    #[test]
    fn simd_and_invalid_modules_are_not_rewritten() {
        let simd = wat(r#"(module (func (result v128) v128.const i64x2 1 2))"#);
        assert_eq!(rewrite(&simd), None, "SIMD: every operation is canonicalized instead");
        assert_eq!(rewrite(b"\0asm\x01\0\0\0\x01junk"), None);
        assert_eq!(rewrite(b"not wasm at all"), None);
    }

    #[test]
    fn a_local_whose_bits_are_never_seen_needs_no_select() {
        // zr and zi only ever meet arithmetic and a comparison (a Mandelbrot step): no select.
        // `out` is stored, and `mid` goes only into `out`: both get canonical values.
        let m = wat(r#"(module (memory 1)
            (func (param $cr f64) (param $ci f64) (local $zr f64) (local $zi f64) (local $t f64) (local $mid f64) (local $out f64)
              (loop $l
                (local.set $t (f64.add (f64.sub (f64.mul (local.get $zr) (local.get $zr)) (f64.mul (local.get $zi) (local.get $zi))) (local.get $cr)))
                (local.set $zi (f64.add (f64.mul (f64.mul (f64.const 2) (local.get $zr)) (local.get $zi)) (local.get $ci)))
                (local.set $zr (local.get $t))
                (br_if $l (f64.le (f64.add (f64.mul (local.get $zr) (local.get $zr)) (f64.mul (local.get $zi) (local.get $zi))) (f64.const 4))))
              (local.set $mid (f64.sqrt (local.get $zr)))
              (local.set $out (local.get $mid))
              (f64.store (i32.const 0) (local.get $out))))"#);
        let out = rewrite(&m).unwrap();
        let ops = ops(&out);
        assert_eq!(selects(&out), 1, "{ops:?}");
        let sqrt = ops.iter().position(|o| o == "F64Sqrt").unwrap();
        assert!(ops[sqrt + 1].starts_with("LocalTee"), "the root goes to `mid`, read into `out`, stored: {ops:?}");
    }

    #[test]
    fn prepare_rewrites_when_asked_and_falls_back_for_simd() {
        let plain = wat(r#"(module (func (param f64) (result f64) local.get 0 f64.sqrt))"#);
        let (bytes, every_op) = prepare(plain.clone(), true);
        assert!(!every_op && selects(&bytes) == 1, "rewritten, Cranelift's option off");
        assert_eq!(prepare(plain.clone(), false), (plain, false), "not asked: as it is");
        let simd = wat(r#"(module (func (result v128) v128.const i64x2 1 2))"#);
        assert_eq!(prepare(simd.clone(), true), (simd, true), "SIMD: as it is, every operation canonical");
    }

    #[test]
    fn a_tee_into_a_blind_local_passes_the_value_on_and_one_into_a_seen_local_does_not() {
        let m = wat(r#"(module (memory 1)
            (func (param f64) (local $blind f64) (local $seen f64)
              i32.const 0  local.get 0  local.get 0  f64.mul  local.tee $blind  f64.store
              local.get 0  local.get 0  f64.mul  local.tee $seen  f64.sqrt  drop
              i32.const 8  local.get $seen  f64.store
              local.get $blind  local.get $blind  f64.lt  drop))"#);
        // The first product is stored (through the tee), the second kept where it is stored.
        assert_eq!(selects(&rewrite(&m).unwrap()), 2);
        let m = wat(r#"(module
            (func (param f64) (result i32) (local $blind f64)
              local.get 0  local.get 0  f64.mul  local.tee $blind  local.get 0  f64.lt))"#);
        assert_eq!(selects(&rewrite(&m).unwrap()), 0, "a tee into a blind local, then a comparison");
    }

    #[test]
    fn a_chain_of_locals_longer_than_the_fixpoint_gives_up_safely() {
        // The product goes through 20 locals, then to memory: every round of the fixpoint uncovers
        // one more local, so it gives up after 16 — and then no local counts as blind.
        let mut body = String::from("local.get 0 local.get 0 f64.mul local.set 1\n");
        for l in 1..20 {
            body.push_str(&format!("local.get {l} local.set {}\n", l + 1));
        }
        body.push_str("i32.const 0 local.get 20 f64.store");
        let m = wat(&format!("(module (memory 1) (func (param f64) (local {}) {body}))", "f64 ".repeat(20)));
        assert_eq!(selects(&rewrite(&m).unwrap()), 1);
    }

    #[test]
    fn a_rewrite_that_would_grow_past_the_bound_is_refused() {
        let body = "local.get 0 f64.sqrt local.set 1 i32.const 0 local.get 1 f64.store\n".repeat(2_000);
        let m = wat(&format!("(module (memory 1) (func (param f64) (local f64) {body}))"));
        // 2,000 selects of 17 bytes against ~13 bytes of code each: past 4×? No: under it.
        let grown = rewrite(&m).map(|o| o.len() as f64 / m.len() as f64);
        assert!(grown.is_some_and(|g| g > 1.5 && g <= MAX_GROWTH as f64), "{grown:?}");
        let body = "local.get 0 f64.sqrt local.set 1\n".repeat(2_000);
        let m = wat(&format!(
            "(module (memory 1) (func (param f64) (local f64) {body} i32.const 0 local.get 1 f64.store))"
        ));
        assert_eq!(rewrite(&m), None, "each 5-byte step would take 17 bytes more");
        assert_eq!(prepare(m.clone(), true), (m, true));
    }

    type OpsBits = (u64, u64, u64, u64, u64, u64, u64, u32, u64);

    // x86-64's own NaN bits are asserted first (other machines differ).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_arithmetic_operation_gives_what_cranelifts_canonicalization_gives() {
        // A NaN with a payload through min, max, ceil, floor, trunc, nearest, sqrt, demote and
        // promote; each result reinterpreted (an escape).
        let m = wat(r#"(module (memory 1)
            (data (i32.const 64) "\01\00\00\00\00\00\f4\7f")
            (data (i32.const 80) "\01\00\a0\7f")
            (func $n (result f64) (f64.load (i32.const 64)))
            (func (export "ops") (result i64 i64 i64 i64 i64 i64 i64 i32 i64)
              (i64.reinterpret_f64 (f64.min (call $n) (f64.const 1)))
              (i64.reinterpret_f64 (f64.max (call $n) (f64.const 1)))
              (i64.reinterpret_f64 (f64.ceil (call $n)))
              (i64.reinterpret_f64 (f64.floor (call $n)))
              (i64.reinterpret_f64 (f64.trunc (call $n)))
              (i64.reinterpret_f64 (f64.nearest (call $n)))
              (i64.reinterpret_f64 (f64.sqrt (call $n)))
              (i32.reinterpret_f32 (f32.demote_f64 (call $n)))
              (i64.reinterpret_f64 (f64.promote_f32 (f32.load (i32.const 80))))))"#);
        let canonical = (CANONICAL_F64, CANONICAL_F64, CANONICAL_F64, CANONICAL_F64, CANONICAL_F64, CANONICAL_F64);
        let expected = (
            canonical.0,
            canonical.1,
            canonical.2,
            canonical.3,
            canonical.4,
            canonical.5,
            CANONICAL_F64,
            CANONICAL_F32,
            CANONICAL_F64,
        );
        let rewritten: OpsBits = call(&crate::child::engine(false).unwrap(), &rewrite(&m).unwrap(), "ops");
        assert_eq!(rewritten, expected);
        assert_eq!(
            call::<OpsBits>(&crate::child::engine(true).unwrap(), &m, "ops"),
            expected,
            "as Cranelift's canonicalization"
        );
        assert_ne!(call::<OpsBits>(&crate::child::engine(false).unwrap(), &m, "ops"), expected, "x86 keeps payloads");
    }

    #[test]
    fn the_scratch_locals_follow_params_and_declared_locals() {
        // Two params, three declared locals (two i32, one f32): scratch locals are 5 and 6.
        let m = wat(r#"(module (memory 1)
            (func (param i32 f64) (local i32 i32 f32)
              local.get 0  local.get 1  local.get 1  f64.add  f64.store
              local.get 0  local.get 4  local.get 4  f32.mul  f32.store))"#);
        let ops = ops(&rewrite(&m).unwrap());
        assert!(ops.iter().any(|o| o == "LocalTee { local_index: 6 }"), "{ops:?}");
        assert!(ops.iter().any(|o| o == "LocalTee { local_index: 5 }"), "{ops:?}");
    }
}
