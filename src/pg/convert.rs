//! Values through column types: a JSON value's text goes through the column type's own input
//! function (with the column's typmod, so `varchar(10)` or `numeric(5,2)` are enforced), and
//! key values are canonicalised through input + output (`"042"` and `42` are the same bigint).

use crate::pg::errors;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;
use std::ffi::{CStr, CString};

/// Types whose text names catalog objects through the session's `search_path` (`reg*`): the same
/// value reads as another object, or fails, in another session. Not allowed in keys.
const SEARCH_PATH_SENSITIVE: [pg_sys::Oid; 11] = [
    pg_sys::REGCLASSOID,
    pg_sys::REGCOLLATIONOID,
    pg_sys::REGCONFIGOID,
    pg_sys::REGDICTIONARYOID,
    pg_sys::REGNAMESPACEOID,
    pg_sys::REGOPEROID,
    pg_sys::REGOPERATOROID,
    pg_sys::REGPROCOID,
    pg_sys::REGPROCEDUREOID,
    pg_sys::REGROLEOID,
    pg_sys::REGTYPEOID,
];

/// Types whose text form depends on session settings (see `fixed_style`).
const STYLE_SENSITIVE: [pg_sys::Oid; 9] = [
    pg_sys::MONEYOID,
    pg_sys::DATEOID,
    pg_sys::TIMESTAMPOID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::TIMETZOID,
    pg_sys::INTERVALOID,
    pg_sys::FLOAT4OID,
    pg_sys::FLOAT8OID,
    pg_sys::BYTEAOID,
];

/// The settings under which pg_ecst reads and prints the values of a stream whose entity keys
/// have a type in [`STYLE_SENSITIVE`]: an entity is known by its key's text, so every session
/// and the worker must print `2024-01-02` alike — under `DateStyle = 'SQL, DMY'` it would be
/// `02/01/2024`, another entity.
const FIXED_STYLE: [(&std::ffi::CStr, &std::ffi::CStr); 6] = [
    (c"DateStyle", c"ISO, MDY"),
    (c"lc_monetary", c"C"),
    (c"IntervalStyle", c"postgres"),
    (c"TimeZone", c"UTC"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
];

/// `FIXED_STYLE` in effect until dropped.
pub fn fixed_style() -> crate::pg::gucs::Override {
    crate::pg::gucs::Override::enter(&FIXED_STYLE)
}

/// Runs `work` (a type's input function or constraint check): a data error it raises (SQLSTATE
/// classes 22/23) is `Err` with PostgreSQL's message; any other error (cancel, out of memory)
/// propagates.
fn data_errors<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    let mut work = Some(work);
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok((work.take().expect("work runs once"))())))
        .catch_others(|e| match e {
            CaughtError::PostgresError(ref r) if errors::is_event_error(&errors::sqlstate(r.sql_error_code())) => {
                Err(r.message().to_string())
            }
            other => other.rethrow(),
        })
        .execute()
}

/// A column's type and the functions that read and print it.
#[derive(Debug, Clone)]
pub struct ColumnType {
    pub oid: pg_sys::Oid,
    pub typmod: i32,
    /// `format_type(oid, typmod)`, for messages.
    pub name: String,
    input: pg_sys::Oid,
    ioparam: pg_sys::Oid,
    output: pg_sys::Oid,
    /// text/varchar without typmod: input and output are the identity.
    plain_text: bool,
    /// A domain: its constraints apply to NULL too, which no input function sees.
    domain: bool,
    /// Reads or prints differently under the session's `DateStyle`, `TimeZone`, `IntervalStyle`,
    /// `extra_float_digits`, `bytea_output` or `lc_monetary` (dates, timestamps, intervals, floats,
    /// bytea, money, and arrays, ranges and multiranges of them).
    pub style_sensitive: bool,
    /// Cannot be a key: composite (its fields' text, and so the entity, would depend on every
    /// field type's session settings) or `reg*` (depends on `search_path`), or arrays, ranges and
    /// domains of those.
    pub unkeyable: bool,
    /// The array type and element layout, for set-based writes (`unnest` of typed arrays).
    array_oid: pg_sys::Oid,
    typlen: i16,
    byval: bool,
    align: std::ffi::c_char,
}

impl ColumnType {
    pub fn new(oid: pg_sys::Oid, typmod: i32, name: String) -> ColumnType {
        let (mut input, mut ioparam, mut output) = (pg_sys::Oid::INVALID, pg_sys::Oid::INVALID, pg_sys::Oid::INVALID);
        let mut varlena = false;
        // SAFETY: plain catalog lookups; they raise an ERROR for a type that does not exist.
        unsafe {
            pg_sys::getTypeInputInfo(oid, &mut input, &mut ioparam);
            pg_sys::getTypeOutputInfo(oid, &mut output, &mut varlena);
        }
        let plain_text = oid == pg_sys::TEXTOID || (oid == pg_sys::VARCHAROID && typmod < 0);
        // SAFETY: a catalog lookup for an existing type.
        let domain = unsafe { pg_sys::get_typtype(oid) } == pg_sys::TYPTYPE_DOMAIN as std::ffi::c_char;
        // SAFETY: catalog lookups for an existing type (its base type, an array's element, a
        // range's or multirange's subtype).
        let innermost = unsafe {
            let mut ty = pg_sys::getBaseType(oid);
            for _ in 0..4 {
                let multirange_of = pg_sys::get_multirange_range(ty);
                let inner = [pg_sys::get_element_type(ty), multirange_of, pg_sys::get_range_subtype(ty)]
                    .into_iter()
                    .find(|t| *t != pg_sys::Oid::INVALID);
                match inner {
                    Some(t) => ty = pg_sys::getBaseType(t),
                    None => break,
                }
            }
            ty
        };
        let style_sensitive = STYLE_SENSITIVE.contains(&innermost);
        // SAFETY: a catalog lookup for an existing type.
        let unkeyable = SEARCH_PATH_SENSITIVE.contains(&innermost)
            || unsafe { pg_sys::get_typtype(innermost) } == pg_sys::TYPTYPE_COMPOSITE as std::ffi::c_char;
        let (mut typlen, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        // SAFETY: catalog lookups for an existing type.
        let array_oid = unsafe {
            pg_sys::get_typlenbyvalalign(oid, &mut typlen, &mut byval, &mut align);
            pg_sys::get_array_type(oid)
        };
        ColumnType {
            oid,
            typmod,
            name,
            input,
            ioparam,
            output,
            plain_text,
            domain,
            style_sensitive,
            unkeyable,
            array_oid,
            typlen,
            byval,
            align,
        }
    }

    /// Reads `text` as a value of this type. `Err` carries PostgreSQL's message for data
    /// errors (SQLSTATE classes 22/23); any other error (cancel, out of memory) propagates.
    pub fn input(&self, text: &str) -> Result<pg_sys::Datum, String> {
        let c = CString::new(text).map_err(|_| "contains a NUL character".to_string())?;
        // SAFETY: `c` outlives the call; the input function copies what it keeps.
        data_errors(|| unsafe {
            pg_sys::OidInputFunctionCall(self.input, c.as_ptr() as *mut _, self.ioparam, self.typmod)
        })
    }

    /// Whether NULL is a value of this type: a domain's `NOT NULL` or `CHECK` may refuse it (`Err`
    /// with PostgreSQL's message), which the input function never sees — nor the executor's row
    /// API, nor a parameter typed as the domain.
    pub fn check_null(&self) -> Result<(), String> {
        if !self.domain {
            return Ok(());
        }
        data_errors(|| {
            let mut extra: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: checks a NULL against the domain's constraints; `extra` caches in the
            // current memory context for this call only.
            unsafe {
                pg_sys::domain_check(pg_sys::Datum::from(0), true, self.oid, &mut extra, pg_sys::CurrentMemoryContext)
            };
        })
    }

    /// Prints a datum of this type.
    pub fn output(&self, datum: pg_sys::Datum) -> String {
        // SAFETY: `datum` is a valid value of this type; the result is a palloc'd C string.
        unsafe {
            let p = pg_sys::OidOutputFunctionCall(self.output, datum);
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            pg_sys::pfree(p.cast());
            s
        }
    }

    /// The array type of this type, if it has one.
    pub fn array_oid(&self) -> Option<pg_sys::Oid> {
        (self.array_oid != pg_sys::Oid::INVALID).then_some(self.array_oid)
    }

    /// A one-dimensional array of this type from datums (`None` is NULL), for `unnest($n)`.
    pub fn array(&self, values: &[Option<pg_sys::Datum>]) -> pgrx::datum::DatumWithOid<'static> {
        let mut datums: Vec<pg_sys::Datum> = values.iter().map(|v| v.unwrap_or(pg_sys::Datum::from(0))).collect();
        let mut nulls: Vec<bool> = values.iter().map(Option::is_none).collect();
        let mut dims = [values.len() as i32];
        let mut lbs = [1i32];
        // SAFETY: datums are values of this type; construct_md_array copies them into a palloc'd array.
        unsafe {
            let array = pg_sys::construct_md_array(
                datums.as_mut_ptr(),
                nulls.as_mut_ptr(),
                1,
                dims.as_mut_ptr(),
                lbs.as_mut_ptr(),
                self.oid,
                self.typlen as i32,
                self.byval,
                self.align,
            );
            pgrx::datum::DatumWithOid::new(pg_sys::Datum::from(array), self.array_oid)
        }
    }

    /// The canonical text of a key value: what the column would print after storing it.
    pub fn canonical(&self, text: &str) -> Result<String, String> {
        if self.plain_text {
            return Ok(text.to_string());
        }
        let datum = self.input(text)?;
        Ok(self.output(datum))
    }
}
