//! A restricted unpickler: exactly the part of pickle that `torch.save` uses for a state_dict, and nothing that
//! can run code. Python's own unpickler imports and calls any global a file names; this one knows a fixed list
//! of globals (OrderedDict, the tensor rebuild helpers, the storage classes), refuses every other name, and
//! "calls" the known ones by building plain data. Nothing here recurses and nothing is allocated from a count
//! the file claims: every length is checked against the bytes that are actually there, and each opcode adds at
//! most one value, so memory stays proportional to the pickle's size.
//!
//! Containers live in an arena (`Pickle::objects`) and values refer to them by index. That keeps `Value` flat:
//! self-referencing or million-deep structures can be built but never cause recursion (when dropping, printing
//! or walking), and getting a memoized container back is O(1) however large it is.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{Error, Result};

/// Element types of torch's typed storages, named as `torch.save` names them (`torch.<Name>Storage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    fn from_storage_class(name: &str) -> Option<DType> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "DoubleStorage" => DType::F64,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
}

/// A pickled value. Containers and torch objects are indices into `Pickle::objects`.
#[derive(Clone, Debug)]
pub enum Value {
    /// None, a bool or a float: checkpoints carry them (optimizer settings, metrics) but no tensor needs them.
    Scalar,
    Int(i64),
    // Rc: memo gets (BINGET) clone values, and a long string fetched a million times must not be copied.
    Str(Rc<str>),
    Obj(usize),
}

/// `('storage', torch.<T>Storage, key, location, numel)`: the zip entry `data/<key>` holds `numel` elements of T.
#[derive(Clone, Debug)]
pub struct StorageRef {
    pub dtype: DType,
    pub key: Rc<str>,
    pub numel: usize,
}

/// The arguments of `_rebuild_tensor_v2`, checked: every element the view touches lies in the declared storage.
#[derive(Clone, Debug)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Copy, Debug)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(DType),
}

#[derive(Debug)]
pub enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    // Entries in pickle order; a repeated key is resolved by the reader (last one wins, as in Python).
    // A Vec, not a map, so that a hostile stream of SETITEMs costs linear time.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// The unpickled object graph: `root` is what the pickle's STOP returned.
pub struct Pickle {
    pub objects: Vec<Object>,
    pub root: Value,
}

impl Pickle {
    pub fn dict(&self, v: &Value) -> Option<&[(Value, Value)]> {
        match object(&self.objects, v) {
            Some(Object::Dict(items)) => Some(items),
            _ => None,
        }
    }

    pub fn tensor(&self, v: &Value) -> Option<&TensorRef> {
        match object(&self.objects, v) {
            Some(Object::Tensor(t)) => Some(t),
            _ => None,
        }
    }
}

fn object<'o>(objects: &'o [Object], v: &Value) -> Option<&'o Object> {
    match v {
        Value::Obj(i) => objects.get(*i),
        _ => None,
    }
}

/// Parse a pickle, refusing anything outside the state_dict subset. Errors name `data.pkl` and the byte offset.
pub fn parse(data: &[u8]) -> Result<Pickle> {
    let mut m =
        Machine { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), objects: Vec::new() };
    loop {
        let at = m.pos;
        match m.bytes(1).and_then(|op| m.step(op[0])) {
            Ok(Some(root)) => return Ok(Pickle { objects: m.objects, root }),
            Ok(None) => {}
            Err(Fail(msg)) => return Err(Error::invalid(format!("data.pkl, byte {at}: {msg}"))),
        }
    }
}

/// Why parsing stopped; `parse` adds where.
struct Fail(String);

fn fail<T>(msg: impl Into<String>) -> std::result::Result<T, Fail> {
    Err(Fail(msg.into()))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    // Stack heights at each MARK; values below the innermost mark cannot be popped (as in Python's metastack).
    marks: Vec<usize>,
    // A map, not a Vec indexed by the memo key: keys come from the file and may be up to 2^32.
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
}

// Opcodes, named as in Python's pickletools.
pub(super) const MARK: u8 = b'(';
pub(super) const STOP: u8 = b'.';
pub(super) const BININT: u8 = b'J';
pub(super) const BININT1: u8 = b'K';
pub(super) const BININT2: u8 = b'M';
pub(super) const NONE: u8 = b'N';
pub(super) const BINPERSID: u8 = b'Q';
pub(super) const REDUCE: u8 = b'R';
pub(super) const BINUNICODE: u8 = b'X';
pub(super) const APPEND: u8 = b'a';
pub(super) const BUILD: u8 = b'b';
pub(super) const GLOBAL: u8 = b'c';
pub(super) const APPENDS: u8 = b'e';
pub(super) const BINGET: u8 = b'h';
pub(super) const LONG_BINGET: u8 = b'j';
pub(super) const EMPTY_LIST: u8 = b']';
pub(super) const BINPUT: u8 = b'q';
pub(super) const LONG_BINPUT: u8 = b'r';
pub(super) const SETITEM: u8 = b's';
pub(super) const TUPLE: u8 = b't';
pub(super) const SETITEMS: u8 = b'u';
pub(super) const EMPTY_DICT: u8 = b'}';
pub(super) const EMPTY_TUPLE: u8 = b')';
pub(super) const BINFLOAT: u8 = b'G';
pub(super) const PROTO: u8 = 0x80;
pub(super) const TUPLE1: u8 = 0x85;
pub(super) const TUPLE2: u8 = 0x86;
pub(super) const TUPLE3: u8 = 0x87;
pub(super) const NEWTRUE: u8 = 0x88;
pub(super) const NEWFALSE: u8 = 0x89;
pub(super) const LONG1: u8 = 0x8a;
pub(super) const SHORT_BINUNICODE: u8 = 0x8c;
pub(super) const BINUNICODE8: u8 = 0x8d;
pub(super) const STACK_GLOBAL: u8 = 0x93;
pub(super) const MEMOIZE: u8 = 0x94;
pub(super) const FRAME: u8 = 0x95;

type Step<T> = std::result::Result<T, Fail>;

impl<'a> Machine<'a> {
    /// Execute one opcode; `Some(root)` at STOP.
    fn step(&mut self, op: u8) -> Step<Option<Value>> {
        match op {
            PROTO => {
                let version = self.bytes(1)?[0];
                if version > 5 {
                    return fail(format!("unsupported pickle protocol {version}"));
                }
            }
            // Framing only groups opcodes for buffered readers; the whole pickle is in memory already.
            FRAME => {
                self.bytes(8)?;
            }
            EMPTY_DICT => self.push_object(Object::Dict(Vec::new())),
            EMPTY_LIST => self.push_object(Object::List(Vec::new())),
            EMPTY_TUPLE => self.push_object(Object::Tuple(Vec::new())),
            MARK => self.marks.push(self.stack.len()),
            BINUNICODE => {
                let n = self.u32()? as usize;
                self.string(n)?;
            }
            SHORT_BINUNICODE => {
                let n = self.bytes(1)?[0] as usize;
                self.string(n)?;
            }
            BINUNICODE8 => {
                let n = usize::try_from(self.u64()?).or_else(|_| fail("string length overflows"))?;
                self.string(n)?;
            }
            BINPUT => {
                let key = self.bytes(1)?[0] as u32;
                self.put(key)?;
            }
            LONG_BINPUT => {
                let key = self.u32()?;
                self.put(key)?;
            }
            MEMOIZE => {
                let key = u32::try_from(self.memo.len()).or_else(|_| fail("memo is full"))?;
                self.put(key)?;
            }
            BINGET => {
                let key = self.bytes(1)?[0] as u32;
                self.get(key)?;
            }
            LONG_BINGET => {
                let key = self.u32()?;
                self.get(key)?;
            }
            GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(module, name)?;
            }
            STACK_GLOBAL => {
                let name = self.pop_str()?;
                let module = self.pop_str()?;
                self.global(&module, &name)?;
            }
            BININT => {
                let b = self.bytes(4)?;
                self.stack.push(Value::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64));
            }
            BININT1 => {
                let b = self.bytes(1)?[0];
                self.stack.push(Value::Int(b as i64));
            }
            BININT2 => {
                let b = self.bytes(2)?;
                self.stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
            }
            LONG1 => {
                let n = self.bytes(1)?[0] as usize;
                let b = self.bytes(n)?;
                if n > 8 {
                    return fail(format!("integer of {n} bytes is too large"));
                }
                // little-endian two's complement: sign-extend from the top byte
                let fill = if b.last().is_some_and(|&x| x >= 0x80) { 0xff } else { 0 };
                let mut le = [fill; 8];
                le[..n].copy_from_slice(b);
                self.stack.push(Value::Int(i64::from_le_bytes(le)));
            }
            BINFLOAT => {
                self.bytes(8)?;
                self.stack.push(Value::Scalar);
            }
            NEWTRUE | NEWFALSE | NONE => self.stack.push(Value::Scalar),
            TUPLE => {
                let items = self.pop_mark()?;
                self.push_object(Object::Tuple(items));
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = (op - TUPLE1 + 1) as usize;
                let items = self.pop_n(n)?;
                self.push_object(Object::Tuple(items));
            }
            REDUCE => {
                let args = self.pop()?;
                let func = self.pop()?;
                let result = self.reduce(func, args)?;
                self.stack.push(result);
            }
            BUILD => {
                // torch uses BUILD only to set `_metadata` on the state_dict OrderedDict; we have no use for it.
                self.pop()?;
                if !matches!(self.top_object()?, Object::Dict(_)) {
                    return fail("BUILD on an object that is not a dict");
                }
            }
            SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.dict_mut()?.push((key, value));
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return fail("SETITEMS with an odd number of items");
                }
                let dict = self.dict_mut()?;
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.push((k, v));
                }
            }
            APPEND => {
                let value = self.pop()?;
                self.list_mut()?.push(value);
            }
            APPENDS => {
                let items = self.pop_mark()?;
                self.list_mut()?.extend(items);
            }
            BINPERSID => {
                let pid = self.pop()?;
                let storage = self.storage(pid)?;
                self.push_object(Object::Storage(storage));
            }
            STOP => return Ok(Some(self.pop()?)),
            _ => return fail(format!("unsupported pickle opcode {op:#04x}")),
        }
        Ok(None)
    }

    /// The next `n` bytes, or an error if the pickle ends first (`n` is never trusted for an allocation).
    fn bytes(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else { return fail("pickle is truncated") };
        let b = &self.data[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn u32(&mut self) -> Step<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Step<u64> {
        let mut le = [0; 8];
        le.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(le))
    }

    fn string(&mut self, n: usize) -> Step<()> {
        let s = std::str::from_utf8(self.bytes(n)?).or_else(|_| fail("string is not UTF-8"))?;
        self.stack.push(Value::Str(Rc::from(s)));
        Ok(())
    }

    /// A newline-terminated ASCII argument of GLOBAL.
    fn line(&mut self) -> Step<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else { return fail("pickle is truncated") };
        let s = std::str::from_utf8(&rest[..n]).or_else(|_| fail("GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push_object(&mut self, object: Object) {
        self.objects.push(object);
        self.stack.push(Value::Obj(self.objects.len() - 1));
    }

    /// Height of the innermost MARK: values below it belong to an enclosing frame.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Value> {
        if self.stack.len() <= self.floor() {
            return fail("pickle stack underflow");
        }
        self.stack.pop().map_or_else(|| fail("pickle stack underflow"), Ok)
    }

    fn pop_n(&mut self, n: usize) -> Step<Vec<Value>> {
        let Some(start) = self.stack.len().checked_sub(n).filter(|&s| s >= self.floor()) else {
            return fail("pickle stack underflow");
        };
        Ok(self.stack.split_off(start))
    }

    /// Everything above the innermost MARK, which is removed.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let Some(start) = self.marks.pop() else { return fail("no MARK on the pickle stack") };
        // pops never cross the mark, so the stack is at least this high
        Ok(self.stack.split_off(start.min(self.stack.len())))
    }

    fn top(&self) -> Step<&Value> {
        match self.stack.last() {
            Some(v) if self.stack.len() > self.floor() => Ok(v),
            _ => fail("pickle stack underflow"),
        }
    }

    fn top_object(&mut self) -> Step<&mut Object> {
        let Value::Obj(i) = *self.top()? else { return fail("expected a container on the pickle stack") };
        self.objects.get_mut(i).map_or_else(|| fail("dangling object reference"), Ok)
    }

    fn dict_mut(&mut self) -> Step<&mut Vec<(Value, Value)>> {
        match self.top_object()? {
            Object::Dict(items) => Ok(items),
            _ => fail("SETITEM on an object that is not a dict"),
        }
    }

    fn list_mut(&mut self) -> Step<&mut Vec<Value>> {
        match self.top_object()? {
            Object::List(items) => Ok(items),
            _ => fail("APPEND on an object that is not a list"),
        }
    }

    fn put(&mut self, key: u32) -> Step<()> {
        let top = self.top()?.clone();
        self.memo.insert(key, top);
        Ok(())
    }

    fn get(&mut self, key: u32) -> Step<()> {
        let Some(v) = self.memo.get(&key) else { return fail(format!("memo key {key} is not defined")) };
        self.stack.push(v.clone());
        Ok(())
    }

    fn pop_str(&mut self) -> Step<Rc<str>> {
        match self.pop()? {
            Value::Str(s) => Ok(s),
            _ => fail("STACK_GLOBAL needs two strings"),
        }
    }

    /// Resolve a global against the allow-list. Anything else is refused here, before it could be called.
    fn global(&mut self, module: &str, name: &str) -> Step<()> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", class) => match DType::from_storage_class(class) {
                Some(dtype) => Global::Storage(dtype),
                None => return refuse(module, name),
            },
            _ => return refuse(module, name),
        };
        self.push_object(Object::Global(g));
        Ok(())
    }

    fn object(&self, v: &Value) -> Option<&Object> {
        object(&self.objects, v)
    }

    fn tuple(&self, v: &Value) -> Step<&[Value]> {
        match self.object(v) {
            Some(Object::Tuple(items)) => Ok(items),
            _ => fail("expected a tuple"),
        }
    }

    /// "Call" an allowed global with `args`, producing plain data.
    fn reduce(&mut self, func: Value, args: Value) -> Step<Value> {
        let Some(&Object::Global(g)) = self.object(&func) else { return fail("REDUCE on something not callable") };
        let args = self.tuple(&args)?;
        match (g, args.len()) {
            (Global::OrderedDict, 0) => {
                self.objects.push(Object::Dict(Vec::new()));
                Ok(Value::Obj(self.objects.len() - 1))
            }
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            (Global::RebuildTensorV2, 6 | 7) => {
                let tensor = self.rebuild_tensor(args)?;
                self.objects.push(Object::Tensor(tensor));
                Ok(Value::Obj(self.objects.len() - 1))
            }
            // (data, requires_grad, backward_hooks[, state]): a Parameter is its tensor to us
            (Global::RebuildParameter, 3) | (Global::RebuildParameterWithState, 4) => match self.object(&args[0]) {
                Some(Object::Tensor(_)) => Ok(args[0].clone()),
                _ => fail("_rebuild_parameter needs a tensor"),
            },
            (g, n) => fail(format!("cannot call {g:?} with {n} arguments")),
        }
    }

    fn rebuild_tensor(&self, args: &[Value]) -> Step<TensorRef> {
        let Some(Object::Storage(storage)) = self.object(&args[0]) else {
            return fail("_rebuild_tensor_v2 needs a storage");
        };
        let offset = to_usize(&args[1])?;
        let size = self.tuple(&args[2])?.iter().map(to_usize).collect::<Step<Vec<_>>>()?;
        let stride = self.tuple(&args[3])?.iter().map(to_usize).collect::<Step<Vec<_>>>()?;
        if size.len() != stride.len() {
            return fail(format!("tensor size {size:?} and stride {stride:?} differ in length"));
        }
        // The view reaches offset + sum((size_i - 1) * stride_i); all of it must lie inside the storage. An empty
        // tensor touches nothing.
        if !size.contains(&0) {
            let last =
                size.iter().zip(&stride).try_fold(offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?));
            if last.is_none_or(|last| last >= storage.numel) {
                return fail(format!(
                    "tensor view (offset {offset}, size {size:?}, stride {stride:?}) reaches past its storage of {} elements",
                    storage.numel
                ));
            }
        }
        Ok(TensorRef { storage: storage.clone(), offset, size, stride })
    }

    /// torch's persistent id for a storage: ('storage', torch.<T>Storage, key, location, numel).
    fn storage(&self, pid: Value) -> Step<StorageRef> {
        let pid = self.tuple(&pid)?;
        let [Value::Str(kind), class, Value::Str(key), Value::Str(_location), numel] = pid else {
            return fail("persistent id is not ('storage', type, key, location, numel)");
        };
        let Some(&Object::Global(Global::Storage(dtype))) = self.object(class) else {
            return fail("persistent id does not name a storage type");
        };
        if &**kind != "storage" {
            return fail(format!("unsupported persistent id kind {kind:?}"));
        }
        Ok(StorageRef { dtype, key: key.clone(), numel: to_usize(numel)? })
    }
}

fn refuse<T>(module: &str, name: &str) -> Step<T> {
    fail(format!(
        "refusing to load global {module}.{name}: only tensors, storages and OrderedDict may appear in a state_dict"
    ))
}

fn to_usize(v: &Value) -> Step<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).or_else(|_| fail(format!("expected a non-negative integer, got {i}"))),
        _ => fail("expected an integer"),
    }
}
