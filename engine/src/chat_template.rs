//! Chat templates: a conversation → the prompt text the model was trained on, from the
//! GGUF's `tokenizer.chat_template` (a Jinja template written for Hugging Face's
//! `apply_chat_template`), rendered with minijinja.
//!
//! The environment mimics what HF and llama.cpp (minja) give a template:
//! `trim_blocks` and `lstrip_blocks` on, a single trailing newline dropped; the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`; the functions
//! `raise_exception(msg)` and `strftime_now(format)`; Python string and dict methods
//! (`.strip()`, `.startswith()`, `.items()` … from `minijinja-contrib`'s pycompat); and a
//! `tojson` that prints like Python's `json.dumps` (`", "` and `": "`, no HTML escaping),
//! which is what HF installs in place of Jinja's own.
//!
//! A GGUF without a template (a base model, such as Gemma 3 270M) has none: the server's chat
//! endpoint refuses with a clear error instead of guessing a format the model never saw.
//! (llama-server falls back to ChatML there; [`CHATML_TEMPLATE`] is kept for callers that
//! want that.)

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use candle_core::quantized::gguf_file;

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;

/// ChatML: what llama-server falls back to for a GGUF without a template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation, as Hugging Face templates read it: `role` and `content`, and
/// for tool use an assistant's `tool_calls` (OpenAI's shape, `function.arguments` as a JSON
/// object, as HF and llama.cpp hand templates) and a tool result's `tool_call_id` / `name`.
/// Absent fields stay undefined in the template, as they are for HF.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None, name: None }
    }
}

/// The tool a template is shown to find out whether it renders tools at all.
const PROBE_TOOL_NAME: &str = "potluck_probe_tool";

/// A compiled chat template with the token texts it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    /// llama.cpp (minja) removes a leading BOS text from the rendered prompt when the
    /// tokenizer adds BOS itself, so templates that print `{{ bos_token }}` do not give two.
    strip_leading_bos: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_chars", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("strip_leading_bos", &self.strip_leading_bos)
            .finish()
    }
}

impl ChatTemplate {
    /// The GGUF's `tokenizer.chat_template` (None when it has none), with BOS/EOS texts from
    /// the tokenizer. If the tokenizer adds BOS itself, a leading BOS text is removed from
    /// rendered prompts, as llama.cpp does.
    pub fn from_gguf(
        content: &gguf_file::Content,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>, EngineError> {
        let source = match content.metadata.get("tokenizer.chat_template") {
            None => return Ok(None),
            Some(gguf_file::Value::String(source)) => source.as_str(),
            Some(other) => {
                return Err(EngineError::BadGguf(format!(
                    "`tokenizer.chat_template` is not a string: {:?}",
                    other.value_type()
                )))
            }
        };
        let token_text = |id: Option<u32>| {
            id.map(|id| String::from_utf8_lossy(&tokenizer.token_bytes(id, true)).into_owned())
                .unwrap_or_default()
        };
        let mut template = Self::new(
            source,
            &token_text(tokenizer.bos_id()),
            &token_text(tokenizer.eos_id()),
        )?;
        template.strip_leading_bos = tokenizer.add_bos();
        Ok(Some(template))
    }

    /// Compiles `source`; syntax errors are reported here, not at render time.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        // HF: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True); llama.cpp's
        // minja uses the same options. Jinja's default drops one trailing newline, as here.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| EngineError::ChatTemplate(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            strip_leading_bos: false,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply should begin. A template's `raise_exception` (e.g. "roles must
    /// alternate") comes back as [`EngineError::ChatTemplate`].
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with the tools the model may call (OpenAI's `tools` list:
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`), passed
    /// as HF's `apply_chat_template(tools=…)` passes them; `None` is the template's `none`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::ChatTemplate(describe(&e)))?;
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => Value::from_serialize(tools),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let rendered = template
            .render(context)
            .map_err(|e| EngineError::ChatTemplate(describe(&e)))?;
        if self.strip_leading_bos && !self.bos_token.is_empty() {
            if let Some(rest) = rendered.strip_prefix(self.bos_token.as_str()) {
                return Ok(rest.to_owned());
            }
        }
        Ok(rendered)
    }
}

impl ChatTemplate {
    /// Whether the template shows the model the tools it is given (llama.cpp decides the
    /// same way: render a conversation with a probe tool and look for its name). A template
    /// that ignores `tools` (SmolLM2's, for one) needs them described some other way.
    pub fn renders_tools(&self) -> bool {
        let probe = serde_json::json!({"type": "function", "function": {
            "name": PROBE_TOOL_NAME, "description": "a probe", "parameters": {"type": "object", "properties": {}}}});
        self.render_with_tools(&[ChatMessage::new("user", "hi")], Some(&[probe]), true)
            .is_ok_and(|text| text.contains(PROBE_TOOL_NAME))
    }
}

/// A minijinja error with its cause chain, on one line.
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time (HF uses local time; a server's local zone is
/// arbitrary anyway). Templates use it for "Today's date" lines.
fn strftime_now(format: String) -> String {
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, unix_s)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// The subset of C `strftime` that chat templates use (`%d %b %Y`, `%B`, `%A`, `%H:%M` …),
/// plus glibc's `%-d`-style unpadded forms; other conversions are copied through.
fn strftime(format: &str, unix_s: i64) -> String {
    let days = unix_s.div_euclid(86_400);
    let seconds_of_day = unix_s.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (
        seconds_of_day / 3600,
        seconds_of_day % 3600 / 60,
        seconds_of_day % 60,
    );

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let number = |value: i64, width: usize| {
            if unpadded {
                value.to_string()
            } else {
                format!("{value:0width$}")
            }
        };
        match spec {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&number(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&number(month, 2)),
            Some('d') => out.push_str(&number(day, 2)),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('j') => out.push_str(&number(day_of_year, 3)),
            Some('H') => out.push_str(&number(hour, 2)),
            Some('I') => out.push_str(&number((hour + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&number(minute, 2)),
            Some('S') => out.push_str(&number(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1–12, day 1–31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// HF's `tojson` filter: Python's `json.dumps(value, ensure_ascii=False, indent=indent,
/// sort_keys=False)`. Unlike minijinja's own it escapes no HTML, and it separates with
/// `", "` / `": "` as Python does, so tool schemas print as the model saw them in training.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_i64() {
            Some(n) => " ".repeat(n.clamp(0, 16) as usize),
            None => v.as_str().map(str::to_owned).unwrap_or_default(),
        }),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    // Accepted for compatibility; Python's defaults are what we print.
    let _ = kwargs.get::<Option<Value>>("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(
        &mut out,
        value,
        &JsonStyle {
            indent,
            ensure_ascii,
            sort_keys,
        },
        0,
    )?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// How deep `tojson` follows nested values before refusing: bounds the recursion on
/// self-referential or adversarially deep input.
const TOJSON_DEPTH_MAX: usize = 128;

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    if depth > TOJSON_DEPTH_MAX {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    let item_separator = if style.indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                out.push_str(&python_float(f));
            }
        }
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                // Python turns non-string keys into their JSON text.
                match key.as_str() {
                    Some(k) => write_json_string(out, k, style.ensure_ascii),
                    None => write_json_string(out, &key.to_string(), style.ensure_ascii),
                }
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_json_string(out, &value.to_string(), style.ensure_ascii),
    }
    Ok(())
}

/// Python's `repr(float)` for the common cases: integral values keep a `.0`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else if f.fract() == 0.0 && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ]
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
        let prompt = t.render(&conversation()[1..2], true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.render(&[], false).unwrap(), "");
    }

    #[test]
    fn hf_whitespace_control() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indent before it,
        // and the template's final newline goes.
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(t.render(&conversation(), false).unwrap(), "[Hi]\n");
    }

    #[test]
    fn python_methods_and_globals() {
        let source = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() if m.role.startswith('us') else m['content'].replace('!', '?') }}|{% endfor %}{{ eos_token }}";
        let messages = vec![
            ChatMessage::new("user", "  hi "),
            ChatMessage::new("assistant", "yo!"),
        ];
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&messages, false).unwrap(), "<s>HI|yo?|</s>");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system message') }}{% endif %}ok";
        let t = ChatTemplate::new(source, "", "").unwrap();
        let err = t.render(&conversation()[1..], false).unwrap_err();
        assert!(
            matches!(&err, EngineError::ChatTemplate(m) if m.contains("need a system message")),
            "{err}"
        );
        assert_eq!(t.render(&conversation(), false).unwrap(), "ok");
    }

    #[test]
    fn syntax_errors_at_construction() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(EngineError::ChatTemplate(_))
        ));
    }

    #[test]
    fn tojson_like_python() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }} {{ [1, 2.5, none, true, 'é<'] | tojson }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "say \"hi\"\n")], false)
            .unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "say \"hi\"\n"} [1, 2.5, null, true, "é<"]"#
        );
        let t = ChatTemplate::new("{{ {'a': [1]} | tojson(indent=2) }}", "", "").unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %-d %B %y, %H:%M:%S %j %%", t),
            "Friday 26 July 24, 13:05:09 208 %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(strftime("%Q", 0), "%Q");
        for days in [-800_000, -1, 0, 59, 60, 11_016, 19_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert!(!strftime_now("%d %b %Y".to_string()).is_empty());
    }
}
