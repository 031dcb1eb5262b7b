//! The compact wire form of a task's state: the format, its bounds checks, and a reader and
//! writer for it, used by the Python bindings (which build Python objects straight from it) and
//! by the Rust API's client of Python flows.
//!
//! A task of a plain Python class crosses a process boundary as its class's module and
//! qualified name plus its attributes. When every attribute value is built from `None`, `bool`,
//! `int` (64-bit), `float`, `str`, small `bytes`, `tuple`, `list` and `dict`, it is written in this
//! tag-length-value form instead of a pickle: nothing to set up per task, and nothing in it
//! describes an object the reader would have to construct, so decoding runs no code of
//! anyone's. Anything else is pickled by the sender; the first byte tells the two apart (a
//! pickle's is `0x80`, its protocol opcode).
//!
//! Layout (integers little-endian):
//!
//! ```text
//! FORMAT(1) module(str) qualname(str) count(u32) { name(str) value }*count
//! value := 0 None | 1 False | 2 True | 3 i64 | 4 f64 | 5 str | 6 bytes
//!        | 7 tuple: n(u32) value*n | 8 list: n(u32) value*n | 9 dict: n(u32) {value value}*n
//! str, bytes := len(u32) raw bytes (UTF-8 for str)
//! ```
//!
//! The reader checks every length against the bytes that are left before anything is
//! allocated for it, and refuses nesting deeper than [`MAX_DEPTH`]: a malformed body is a
//! [`Malformed`] error, never a panic or an allocation the body did not pay for.

use std::fmt;

/// The first byte of a body in this form.
pub const FORMAT: u8 = 0xA1;
/// Containers nested deeper than this are not written in this form (and refused when read).
pub const MAX_DEPTH: usize = 32;
/// Items a reader reserves room for before reading them. A count is checked against the whole
/// body that is left, and each of the nested containers may claim most of it: reserving what
/// they claim would let a small body reserve hundreds of times its size.
pub const PREALLOCATED: usize = 64;

pub const NONE: u8 = 0;
pub const FALSE: u8 = 1;
pub const TRUE: u8 = 2;
pub const INT: u8 = 3;
pub const FLOAT: u8 = 4;
pub const STR: u8 = 5;
pub const BYTES: u8 = 6;
pub const TUPLE: u8 = 7;
pub const LIST: u8 = 8;
pub const DICT: u8 = 9;

/// A body that is not in this form, or is cut short, or claims more than it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub what: String,
    /// Where in the body it was found.
    pub at: usize,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed task body: {} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for Malformed {}

fn malformed(what: impl Into<String>, at: usize) -> Malformed {
    Malformed { what: what.into(), at }
}

/// A value of the form, owned (for readers that do not build objects of their own).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
}

/// A decoded body: the class and the attributes, in their order.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub module: String,
    pub qualname: String,
    pub fields: Vec<(String, Value)>,
}

/// Reads a body. The header ([`Reader::new`]) first, then [`Reader::field_count`] names
/// ([`Reader::str`]) each followed by a value, then [`Reader::finished`].
pub struct Reader<'b> {
    data: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    /// A reader past the header: returns it with the class's module and qualified name.
    pub fn new(data: &'b [u8]) -> Result<(Self, &'b str, &'b str), Malformed> {
        let mut r = Reader { data, at: 0 };
        if r.byte()? != FORMAT {
            return Err(malformed("not a compact task body", 0));
        }
        let module = r.str()?;
        let qualname = r.str()?;
        Ok((r, module, qualname))
    }

    pub fn position(&self) -> usize {
        self.at
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8], Malformed> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.data.len());
        let end = end.ok_or_else(|| malformed("truncated", self.at))?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    pub fn byte(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes taken")))
    }

    /// The payload of [`INT`].
    pub fn int(&mut self) -> Result<i64, Malformed> {
        Ok(self.u64()? as i64)
    }

    /// The payload of [`FLOAT`].
    pub fn float(&mut self) -> Result<f64, Malformed> {
        Ok(f64::from_bits(self.u64()?))
    }

    /// A `str` (a name, or the payload of [`STR`]).
    pub fn str(&mut self) -> Result<&'b str, Malformed> {
        let at = self.at;
        let n = self.u32()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| malformed("invalid UTF-8", at))
    }

    /// The payload of [`BYTES`].
    pub fn bytes(&mut self) -> Result<&'b [u8], Malformed> {
        let n = self.u32()?;
        self.take(n)
    }

    /// A count of items that each take at least `min_size` bytes: refused when the bytes left
    /// cannot hold them, so that no claimed count makes a reader allocate.
    fn count(&mut self, min_size: usize) -> Result<usize, Malformed> {
        let at = self.at;
        let n = self.u32()?;
        if n.saturating_mul(min_size) > self.data.len() - self.at {
            return Err(malformed("a count past the end", at));
        }
        Ok(n)
    }

    /// How many attributes follow the header.
    pub fn field_count(&mut self) -> Result<usize, Malformed> {
        self.count(5) // a name's length and a value's tag at least
    }

    /// The item count of a [`TUPLE`] or [`LIST`].
    pub fn sequence_len(&mut self) -> Result<usize, Malformed> {
        self.count(1)
    }

    /// The pair count of a [`DICT`].
    pub fn dict_len(&mut self) -> Result<usize, Malformed> {
        self.count(2)
    }

    /// A value's tag, refusing a container nested past [`MAX_DEPTH`] (`depth`: how many
    /// containers hold it) and tags this form does not have.
    pub fn tag(&mut self, depth: usize) -> Result<u8, Malformed> {
        let at = self.at;
        let tag = self.byte()?;
        match tag {
            NONE..=BYTES => Ok(tag),
            TUPLE | LIST | DICT if depth >= MAX_DEPTH => Err(malformed("nesting too deep", at)),
            TUPLE | LIST | DICT => Ok(tag),
            _ => Err(malformed(format!("unknown tag {tag}"), at)),
        }
    }

    /// Where a dict key was found unusable (a list: a body no writer of this form makes).
    pub fn unhashable_key(&self, at: usize) -> Malformed {
        malformed("an unhashable key", at)
    }

    /// Moves past a value without building it.
    pub fn skip_value(&mut self, depth: usize) -> Result<(), Malformed> {
        match self.tag(depth)? {
            NONE | FALSE | TRUE => {}
            INT | FLOAT => {
                self.take(8)?;
            }
            STR | BYTES => {
                self.bytes()?;
            }
            TUPLE | LIST => {
                for _ in 0..self.sequence_len()? {
                    self.skip_value(depth + 1)?;
                }
            }
            _ => {
                for _ in 0..self.dict_len()? {
                    self.skip_value(depth + 1)?;
                    self.skip_value(depth + 1)?;
                }
            }
        }
        Ok(())
    }

    /// A value, owned.
    pub fn value(&mut self, depth: usize) -> Result<Value, Malformed> {
        Ok(match self.tag(depth)? {
            NONE => Value::None,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            INT => Value::Int(self.int()?),
            FLOAT => Value::Float(self.float()?),
            STR => Value::Str(self.str()?.to_owned()),
            BYTES => Value::Bytes(self.bytes()?.to_vec()),
            tag @ (TUPLE | LIST) => {
                let n = self.sequence_len()?;
                let mut items = Vec::with_capacity(n.min(PREALLOCATED));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                if tag == TUPLE {
                    Value::Tuple(items)
                } else {
                    Value::List(items)
                }
            }
            _ => {
                let n = self.dict_len()?;
                let mut pairs = Vec::with_capacity(n.min(PREALLOCATED));
                for _ in 0..n {
                    let at = self.at;
                    let key = self.value(depth + 1)?;
                    if !key.hashable() {
                        return Err(self.unhashable_key(at));
                    }
                    pairs.push((key, self.value(depth + 1)?));
                }
                Value::Dict(pairs)
            }
        })
    }

    /// Refuses bytes left after the last value.
    pub fn finished(&self) -> Result<(), Malformed> {
        if self.at != self.data.len() {
            return Err(malformed("bytes after the state", self.at));
        }
        Ok(())
    }
}

impl Value {
    /// Whether Python could use it as a dict key (no list or dict in it).
    pub fn hashable(&self) -> bool {
        match self {
            Value::List(_) | Value::Dict(_) => false,
            Value::Tuple(items) => items.iter().all(Value::hashable),
            _ => true,
        }
    }
}

/// The whole of a body, owned.
pub fn decode(data: &[u8]) -> Result<TaskState, Malformed> {
    let (mut r, module, qualname) = Reader::new(data)?;
    let n = r.field_count()?;
    let mut fields = Vec::with_capacity(n.min(PREALLOCATED));
    for _ in 0..n {
        let name = r.str()?.to_owned();
        fields.push((name, r.value(0)?));
    }
    r.finished()?;
    Ok(TaskState { module: module.to_owned(), qualname: qualname.to_owned(), fields })
}

/// Why a value cannot be written in this form (its sender pickles it instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// Writes a body: [`Writer::new`] writes the header, then `count` times a name
/// ([`Writer::str`]) and a value.
pub struct Writer {
    out: Vec<u8>,
}

impl Writer {
    /// A body for a task of `module.qualname` with `count` attributes.
    pub fn new(module: &str, qualname: &str, count: usize) -> Result<Self, TooLong> {
        let mut w = Writer { out: Vec::with_capacity(256) };
        w.out.push(FORMAT);
        w.str(module)?;
        w.str(qualname)?;
        w.len(count)?;
        Ok(w)
    }

    /// A length or count (past `u32::MAX`: not this form).
    pub fn len(&mut self, n: usize) -> Result<(), TooLong> {
        let n = u32::try_from(n).map_err(|_| TooLong)?;
        self.out.extend_from_slice(&n.to_le_bytes());
        Ok(())
    }

    pub fn tag(&mut self, tag: u8) {
        self.out.push(tag);
    }

    /// A `str`: a name, or after a [`STR`] tag.
    pub fn str(&mut self, s: &str) -> Result<(), TooLong> {
        self.bytes(s.as_bytes())
    }

    /// Length-prefixed bytes: after a [`BYTES`] tag (or a [`STR`] one, UTF-8).
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), TooLong> {
        self.len(b.len())?;
        self.out.extend_from_slice(b);
        Ok(())
    }

    pub fn int(&mut self, n: i64) {
        self.out.push(INT);
        self.out.extend_from_slice(&n.to_le_bytes());
    }

    pub fn float(&mut self, f: f64) {
        self.out.push(FLOAT);
        self.out.extend_from_slice(&f.to_bits().to_le_bytes());
    }

    /// A value, owned (nesting past [`MAX_DEPTH`]: not this form).
    pub fn value(&mut self, v: &Value, depth: usize) -> Result<(), TooLong> {
        match v {
            Value::None => self.tag(NONE),
            Value::Bool(b) => self.tag(if *b { TRUE } else { FALSE }),
            Value::Int(n) => self.int(*n),
            Value::Float(f) => self.float(*f),
            Value::Str(s) => {
                self.tag(STR);
                self.str(s)?;
            }
            Value::Bytes(b) => {
                self.tag(BYTES);
                self.bytes(b)?;
            }
            Value::Tuple(items) | Value::List(items) => {
                if depth >= MAX_DEPTH {
                    return Err(TooLong);
                }
                self.tag(if matches!(v, Value::Tuple(_)) { TUPLE } else { LIST });
                self.len(items.len())?;
                for item in items {
                    self.value(item, depth + 1)?;
                }
            }
            Value::Dict(pairs) => {
                if depth >= MAX_DEPTH {
                    return Err(TooLong);
                }
                self.tag(DICT);
                self.len(pairs.len())?;
                for (key, item) in pairs {
                    self.value(key, depth + 1)?;
                    self.value(item, depth + 1)?;
                }
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<u8> {
        self.out
    }
}

/// A whole body from an owned state.
pub fn encode(state: &TaskState) -> Result<Vec<u8>, TooLong> {
    let mut w = Writer::new(&state.module, &state.qualname, state.fields.len())?;
    for (name, value) in &state.fields {
        w.str(name)?;
        w.value(value, 0)?;
    }
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> TaskState {
        TaskState {
            module: "tests.handlers".into(),
            qualname: "Task".into(),
            fields: vec![
                ("x".into(), Value::Int(-3)),
                ("nan".into(), Value::Float(f64::NAN)),
                ("label".into(), Value::Str("ünï ✓".into())),
                (
                    "nested".into(),
                    Value::Dict(vec![(
                        Value::Tuple(vec![Value::Int(1), Value::None]),
                        Value::List(vec![Value::Bytes(vec![0, 255]), Value::Bool(true)]),
                    )]),
                ),
            ],
        }
    }

    #[test]
    fn a_state_comes_back_as_it_was_written() {
        let body = encode(&sample()).unwrap();
        assert_eq!(body[0], FORMAT);
        let back = decode(&body).unwrap();
        assert_eq!(back.fields[0], sample().fields[0]);
        assert!(matches!(back.fields[1].1, Value::Float(f) if f.is_nan()));
        assert_eq!(back.fields[2..], sample().fields[2..]);
        assert_eq!((back.module.as_str(), back.qualname.as_str()), ("tests.handlers", "Task"));
    }

    #[test]
    fn every_truncation_is_malformed() {
        let body = encode(&sample()).unwrap();
        for end in 0..body.len() {
            assert!(decode(&body[..end]).is_err(), "cut at {end}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert_eq!(decode(&longer).unwrap_err().what, "bytes after the state");
    }

    #[test]
    fn claimed_counts_past_the_end_are_refused_before_allocating() {
        let mut w = Writer::new("m", "Q", 1).unwrap();
        w.str("a").unwrap();
        w.tag(LIST);
        w.len(u32::MAX as usize).unwrap();
        let err = decode(&w.finish()).unwrap_err();
        assert_eq!(err.what, "a count past the end");
    }

    #[test]
    fn nesting_past_the_limit_is_neither_written_nor_read() {
        let mut deep = Value::None;
        for _ in 0..=MAX_DEPTH {
            deep = Value::List(vec![deep]);
        }
        let state = TaskState { module: "m".into(), qualname: "Q".into(), fields: vec![("a".into(), deep)] };
        assert_eq!(encode(&state), Err(TooLong));
        let mut body = Writer::new("m", "Q", 1).unwrap();
        body.str("a").unwrap();
        for _ in 0..=MAX_DEPTH {
            body.tag(LIST);
            body.len(1).unwrap();
        }
        body.tag(NONE);
        assert_eq!(decode(&body.finish()).unwrap_err().what, "nesting too deep");
    }

    #[test]
    fn an_unhashable_key_is_malformed() {
        let mut w = Writer::new("m", "Q", 1).unwrap();
        w.str("a").unwrap();
        w.tag(DICT);
        w.len(1).unwrap();
        w.tag(LIST);
        w.len(0).unwrap();
        w.tag(NONE);
        assert_eq!(decode(&w.finish()).unwrap_err().what, "an unhashable key");
    }

    proptest! {
        #[test]
        fn no_body_panics_the_reader(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut body = body;
            if let Some(first) = body.first_mut() {
                *first = FORMAT;
            }
            let _ = decode(&body);
            let _ = Reader::new(&body).map(|(mut r, _, _)| r.skip_value(0));
        }
    }
}
