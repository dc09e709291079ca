//! The `tojson` filter of `transformers`' chat templates: Python's `json.dumps` over minijinja
//! values, bounded by the render's fuel.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{ErrorKind, State};

/// `tojson` as `transformers` defines it:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`;
/// positional arguments follow that order.
///
/// Bounded like minijinja's own `tojson`: the text may not outgrow what the render's remaining
/// fuel pays for (16 units a byte, as minijinja charges serialization), checked as it grows, so
/// `tojson(indent=10**12)` or a deep `indent` fails with `OutOfFuel` instead of allocating.
pub(super) fn py_tojson(
    state: &State,
    value: &Value,
    positional: &[Value],
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let arg = |i: usize, name: &str| -> std::result::Result<Option<Value>, minijinja::Error> {
        match positional.get(i) {
            Some(v) => Ok(Some(v.clone())),
            None => kwargs.get::<Option<Value>>(name),
        }
    };
    if positional.len() > 4 {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    // Bytes of JSON the remaining fuel pays for (no fuel set: unbounded).
    let max_bytes = state.fuel_levels().map_or(usize::MAX, |(_, remaining)| {
        usize::try_from(remaining.saturating_mul(JSON_BYTES_PER_FUEL)).unwrap_or(usize::MAX)
    });
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.to_string()),
        Some(v) => {
            let n = usize::try_from(i64::try_from(v)?).unwrap_or(0);
            if n > max_bytes {
                return Err(json_too_big(max_bytes));
            }
            Some(" ".repeat(n))
        }
    };
    let (item_sep, key_sep) = match arg(2, "separators")? {
        Some(v) if !(v.is_none() || v.is_undefined()) => {
            let parts: Vec<String> = v.try_iter()?.map(|p| p.to_string()).collect();
            match <[String; 2]>::try_from(parts) {
                Ok([item, key]) => (item, key),
                Err(_) => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be an (item, key) pair",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let mut writer = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
        depth: 0,
        max_bytes,
    };
    writer.value(value)?;
    // Charged as minijinja charges its own serializations (the engine adds the returned
    // string's bytes itself).
    state.consume_fuel(writer.out.len() as u64 / JSON_BYTES_PER_FUEL)?;
    Ok(Value::from(writer.out))
}

/// The deepest nesting `tojson` writes (Python's default recursion limit is 1000).
const MAX_JSON_DEPTH: usize = 500;

/// Bytes of `tojson` output one fuel pays for (minijinja charges 16 of its 64 units per
/// serialized byte).
const JSON_BYTES_PER_FUEL: u64 = 4;

/// The error of a `tojson` past what the render's fuel pays for.
fn json_too_big(max_bytes: usize) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::OutOfFuel,
        format!("tojson: the JSON would pass the {max_bytes} bytes the remaining fuel pays for"),
    )
}

/// Python's `json.dumps` over minijinja values.
struct PyJson {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
    depth: usize,
    /// The most bytes `out` may grow to.
    max_bytes: usize,
}

impl PyJson {
    /// Fails once `out` plus `more` bytes would pass `max_bytes`.
    fn room_for(&self, more: usize) -> std::result::Result<(), minijinja::Error> {
        if self.out.len().saturating_add(more) > self.max_bytes {
            return Err(json_too_big(self.max_bytes));
        }
        Ok(())
    }

    fn value(&mut self, v: &Value) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(v)?,
            ValueKind::String | ValueKind::Plain => self.string(&v.to_string())?,
            ValueKind::Bytes | ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container('[', ']', items.len(), |w, i| w.value(&items[i]))?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let value = v.get_item(&key)?;
                    entries.push((self.key(&key)?, value));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.container('{', '}', entries.len(), |w, i| {
                    w.string(&entries[i].0)?;
                    w.out.push_str(&w.key_sep.clone());
                    w.value(&entries[i].1)
                })?;
            }
            ValueKind::Invalid => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("cannot serialize {v:?} to JSON"),
                ))
            }
            _ => self.string(&v.to_string())?,
        }
        Ok(())
    }

    /// `len` items between `open` and `close`, laid out like `json.dumps`.
    fn container(
        &mut self,
        open: char,
        close: char,
        len: usize,
        mut item: impl FnMut(&mut Self, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        self.out.push(open);
        if len == 0 {
            self.out.push(close);
            return Ok(());
        }
        if self.depth >= MAX_JSON_DEPTH {
            // Python's json.dumps stops at its recursion limit too; here it guards our stack.
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: the value is nested more than {MAX_JSON_DEPTH} levels deep"),
            ));
        }
        self.depth += 1;
        for i in 0..len {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.room_for(sep.len())?;
                self.out.push_str(&sep);
            }
            self.newline()?;
            item(self, i)?;
        }
        self.depth -= 1;
        self.newline()?;
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self) -> std::result::Result<(), minijinja::Error> {
        if let Some(indent) = &self.indent {
            self.room_for(indent.len().saturating_mul(self.depth).saturating_add(1))?;
            self.out.push('\n');
            for _ in 0..self.depth {
                self.out.push_str(indent);
            }
        }
        Ok(())
    }

    /// Dict keys become strings as in Python: `1` → `"1"`, `true` → `"true"`, `None` → `"null"`.
    fn key(&self, key: &Value) -> std::result::Result<String, minijinja::Error> {
        Ok(match key.kind() {
            ValueKind::String => key.to_string(),
            ValueKind::None | ValueKind::Undefined => "null".to_string(),
            ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
            ValueKind::Number => {
                let mut w = PyJson {
                    out: String::new(),
                    indent: None,
                    item_sep: String::new(),
                    key_sep: String::new(),
                    ensure_ascii: false,
                    sort_keys: false,
                    depth: 0,
                    max_bytes: usize::MAX,
                };
                w.number(key)?;
                w.out
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("JSON keys must be str, int, float, bool or None, not {key:?}"),
                ))
            }
        })
    }

    fn number(&mut self, v: &Value) -> std::result::Result<(), minijinja::Error> {
        if v.is_integer() {
            self.out.push_str(&v.to_string());
            return Ok(());
        }
        let f = f64::try_from(v.clone())?;
        if f.is_nan() {
            self.out.push_str("NaN");
        } else if f.is_infinite() {
            self.out
                .push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            // Python's float repr: always a '.' or an exponent, and a signed exponent.
            let s = format!("{f:?}");
            match s.split_once('e') {
                Some((mantissa, exp)) if !exp.starts_with('-') => {
                    self.out.push_str(&format!("{mantissa}e+{exp}"))
                }
                _ => self.out.push_str(&s),
            }
        }
        Ok(())
    }

    /// Writes `s` quoted; checked after (its escaped form is at most 6 bytes per byte of a value
    /// that exists already).
    fn string(&mut self, s: &str) -> std::result::Result<(), minijinja::Error> {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
        self.room_for(0)
    }
}
#[cfg(test)]
mod tests {
    use super::super::fixtures::check;
    use super::super::Message;

    #[test]
    fn tojson_writes_python_json() {
        let source = "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|\
                      {{ {'b': [1, 2.0, 1e20, none, true], 'a': 'é\"<'} | tojson(sort_keys=true) }}|\
                      {{ 'é😀\x7f' | tojson(ensure_ascii=true) }}|{{ [1, 2] | tojson(separators=[',', ':']) }}";
        check(
            source,
            &[Message::user("hi")],
            "{\"role\": \"user\", \"content\": \"hi\"}|\
             [\n  {\n    \"role\": \"user\",\n    \"content\": \"hi\"\n  }\n]|\
             {\"a\": \"é\\\"<\", \"b\": [1, 2.0, 1e+20, null, true]}|\
             \"\\u00e9\\ud83d\\ude00\\u007f\"|[1,2]",
        );
    }

    #[test]
    fn dicts_keep_their_insertion_order_like_python() {
        // Python: json.dumps({'b': 1, 'a': 2}) == '{"b": 1, "a": 2}'
        check(
            "{{ {'b': 1, 'a': 2, 'c': {'z': 0, 'y': 1}} | tojson }}|{% for k in {'b': 1, 'a': 2} %}{{ k }}{% endfor %}",
            &[Message::user("x")],
            "{\"b\": 1, \"a\": 2, \"c\": {\"z\": 0, \"y\": 1}}|ba",
        );
    }
}
