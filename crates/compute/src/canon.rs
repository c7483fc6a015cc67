//! NaNs made canonical where a module can see their bits, not after every float operation.
//!
//! Redundant runs of a job (N > 1) are compared byte for byte, so the same module and inputs must
//! give the same output on every provider. WebAssembly is deterministic except for the bits of a
//! NaN that an arithmetic operation produces (x86 and ARM differ in sign and payload). Wasmtime
//! can canonicalize the result of every float operation (`cranelift_nan_canonicalization`), which
//! costs ~3–5× on tight float loops (measured: `cargo xtask bench wasm`).
//!
//! The bits of a NaN only matter where they can reach something observable. Comparisons treat
//! every NaN alike, arithmetic turns a NaN into a NaN, conversions to integers trap or saturate the
//! same way for every NaN; what does expose the bits is:
//! - `f32.store` / `f64.store` (memory can be read back as integers, and is what the host sees),
//! - `i32.reinterpret_f32` / `i64.reinterpret_f64`,
//! - the sign operand of `f32.copysign` / `f64.copysign` (a NaN's sign becomes a number's).
//!
//! [`at_escapes`] rewrites a module so that the float value reaching each of those is replaced by
//! the canonical NaN (`0x7fc00000` / `0x7ff8000000000000`, the bits Cranelift's own
//! canonicalization uses) when it is a NaN — `x == x ? x : nan`, a compare and a select — and
//! leaves every other instruction as it is. Everything else a module can observe (its calls to
//! WASI take integers only; no other import is offered; exports are not read) follows from
//! those bits.
//!
//! A module using SIMD (`v128` values can be reinterpreted lane by lane, implicitly) or anything
//! this rewrite does not know gets `None`: the caller then uses Cranelift's canonicalization of
//! every operation, as before. The rewritten module is validated before it is returned.

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

/// `bytes` rewritten so that every NaN whose bits can be observed is canonical (see the module
/// docs), or `None` when the module uses SIMD, is not valid, or cannot be rewritten: the caller
/// then canonicalizes every float operation instead.
pub fn at_escapes(bytes: &[u8]) -> Option<Vec<u8>> {
    Validator::new_with_features(features()).validate_all(bytes).ok()?;
    let params = param_counts(bytes)?;
    let mut rewriter = Rewriter { params, next: 0 };
    let mut module = wasm_encoder::Module::new();
    rewriter.parse_core_module(&mut module, Parser::new(0), bytes).ok()?;
    let out = module.finish();
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

/// Where a float's bits escape, and of which width.
fn escape(op: &Operator<'_>) -> Option<ValType> {
    match op {
        Operator::F32Store { .. } | Operator::I32ReinterpretF32 | Operator::F32Copysign => Some(ValType::F32),
        Operator::F64Store { .. } | Operator::I64ReinterpretF64 | Operator::F64Copysign => Some(ValType::F64),
        _ => None,
    }
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
        while !reader.eof() {
            let op = reader.read()?;
            match escape(&op) {
                Some(ValType::F32) => {
                    // [x] → [x == x ? x : nan]
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
            f.instruction(&self.instruction(op)?);
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

    #[test]
    fn each_escape_gets_a_select_and_nothing_else_changes() {
        let m = wat(r#"(module (memory 1)
            (func (param f64) (result i64)
              i32.const 0  local.get 0  f64.const 1  f64.add  f64.store
              f32.const 1  f32.const 0  f32.const 0  f32.div  f32.copysign  drop
              local.get 0  f64.sqrt  i64.reinterpret_f64))"#);
        let out = at_escapes(&m).unwrap();
        let ops = ops(&out);
        assert_eq!(ops.iter().filter(|o| o.starts_with("Select")).count(), 3, "{ops:?}");
        assert_eq!(ops.iter().filter(|o| o.starts_with("F64Add") || o.starts_with("F32Div")).count(), 2);
        // The escapes themselves are kept, each right after its select.
        for escape in ["F64Store", "F32Copysign", "I64ReinterpretF64"] {
            let at = ops.iter().position(|o| o.starts_with(escape)).unwrap();
            assert!(ops[at - 1].starts_with("Select"), "{escape} in {ops:?}");
        }
    }

    /// Runs the module's `bits` export on an engine that canonicalizes nothing itself.
    fn bits(module: &[u8]) -> (u64, u64, i64, u32) {
        let engine = crate::child::engine(false).unwrap();
        let module = wasmtime::Module::new(&engine, module).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        let f = instance.get_typed_func::<(), (u64, u64, i64, u32)>(&mut store, "bits").unwrap();
        f.call(&mut store, ()).unwrap()
    }

    #[test]
    fn the_rewrite_alone_makes_every_escaping_nan_canonical() {
        // A NaN with a payload plus 1 (x86 keeps the payload), stored; 0/0 (x86: negative)
        // reinterpreted; its sign given to 1 by copysign; an f32 0/0 stored. Zeros come from memory
        // so that nothing is folded at compile time.
        let m = wat(r#"(module (memory 1)
            (data (i32.const 64) "\01\00\00\00\00\00\f4\7f")
            (func (export "bits") (result i64 i64 i64 i32)
              (f64.store (i32.const 64) (f64.add (f64.load (i32.const 64)) (f64.const 1)))
              (f32.store (i32.const 88) (f32.div (f32.load (i32.const 128)) (f32.load (i32.const 128))))
              (i64.load (i32.const 64))
              (i64.reinterpret_f64 (f64.div (f64.load (i32.const 128)) (f64.load (i32.const 128))))
              (i64.trunc_f64_s (f64.copysign (f64.const 1) (f64.div (f64.load (i32.const 128)) (f64.load (i32.const 128)))))
              (i32.load (i32.const 88))))"#);
        let plain = bits(&m);
        assert_ne!(plain.0, CANONICAL_F64, "x86 keeps the payload: {plain:x?}");
        assert_ne!(plain.1, CANONICAL_F64, "{plain:x?}");
        assert_eq!(plain.2, -1, "x86's 0/0 is negative");
        assert_ne!(plain.3, CANONICAL_F32, "{plain:x?}");
        assert_eq!(bits(&at_escapes(&m).unwrap()), (CANONICAL_F64, CANONICAL_F64, 1, CANONICAL_F32));
    }

    #[test]
    fn a_module_without_escapes_is_left_as_it_was_but_for_two_locals() {
        let m = wat(r#"(module (func (param f64) (result f64) local.get 0 local.get 0 f64.mul))"#);
        let out = at_escapes(&m).unwrap();
        assert_eq!(ops(&out), ops(&m));
    }

    #[test]
    fn simd_and_invalid_modules_are_not_rewritten() {
        let simd = wat(r#"(module (func (result v128) v128.const i64x2 1 2))"#);
        assert_eq!(at_escapes(&simd), None, "SIMD: every operation is canonicalized instead");
        assert_eq!(at_escapes(b"\0asm\x01\0\0\0\x01junk"), None);
        assert_eq!(at_escapes(b"not wasm at all"), None);
    }

    #[test]
    fn the_scratch_locals_follow_params_and_declared_locals() {
        // Two params, three declared locals (two i32, one f32): scratch locals are 5 and 6.
        let m = wat(r#"(module (memory 1)
            (func (param i32 f64) (local i32 i32 f32)
              local.get 0  local.get 1  f64.store
              local.get 0  local.get 4  f32.store))"#);
        let ops = ops(&at_escapes(&m).unwrap());
        assert!(ops.iter().any(|o| o == "LocalTee { local_index: 6 }"), "{ops:?}");
        assert!(ops.iter().any(|o| o == "LocalTee { local_index: 5 }"), "{ops:?}");
    }
}
