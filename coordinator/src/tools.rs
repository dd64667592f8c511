//! Tool calls: OpenAI's `tools` / `tool_choice` shown to the model through its chat template,
//! and the model's tool-call syntax parsed back into `tool_calls`.
//!
//! Each model family writes calls its own way, which its template teaches it:
//! - **Hermes** (Qwen 2.5 and 3, Hermes 2 Pro and 3, SmolLM3): `<tool_call>{"name": …,
//!   "arguments": {…}}</tool_call>`, as many as it likes, after any text.
//! - **Llama 3.x**: the whole answer is one JSON object `{"name": …, "parameters": {…}}`.
//! - **Mistral**: the control token `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`
//!   (the token is not text, so the answer reads as the list).
//! - **Generic**, for a template that ignores `tools` (SmolLM2's): a system message describes
//!   the tools and the answer is JSON, `{"tool_call": {"name", "arguments"}}` or
//!   `{"response": "…"}`, held to that shape by the grammar ([`crate::structured`]) — so even
//!   a small model answers in a form that parses (llama.cpp's "generic" format works so).
//!
//! With `tool_choice` `"required"` or a named function the call is forced: the prompt ends
//! with the family's opening (`<tool_call>\n`, `[TOOL_CALLS]`) and the grammar allows only a
//! call whose arguments are valid under the function's JSON schema.
//!
//! [`ToolStream`] is sans-IO: fed the answer's text as it is generated, it releases what can
//! be shown as content and the calls as OpenAI's streamed deltas.

use potluck_engine::chat_template::{ChatMessage, ChatTemplate};
use serde_json::{json, Map, Value};

/// Tools one request may declare at most (OpenAI's documented limit is 128).
pub const TOOLS_MAX: usize = 128;
/// Longest function name (OpenAI: `^[a-zA-Z0-9_-]{1,64}$`).
pub const TOOL_NAME_BYTES_MAX: usize = 64;

/// How a model family writes tool calls (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3,
    Mistral,
    Generic,
}

impl ToolFormat {
    /// The family a chat template belongs to, by the call syntax it teaches; a template that
    /// does not show the model its tools is [`ToolFormat::Generic`]. A template that renders
    /// tools with a syntax not listed here is read as Llama 3's (a bare JSON call), which is
    /// also what the forced form writes.
    pub fn detect(template: &ChatTemplate) -> Self {
        if !template.renders_tools() {
            return Self::Generic;
        }
        let source = template.source();
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else {
            Self::Llama3
        }
    }

    /// The key of a call's arguments in this family's JSON.
    fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3 => "parameters",
            _ => "arguments",
        }
    }

    /// Text the prompt ends with when a call is forced: the family's opening of a call.
    pub fn forced_opening(self) -> &'static str {
        match self {
            Self::Hermes => "<tool_call>\n",
            Self::Mistral => "[TOOL_CALLS]",
            Self::Llama3 | Self::Generic => "",
        }
    }
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Named(String),
}

/// One declared function.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// Its arguments' JSON schema (`{"type": "object"}` when the tool gives none).
    pub parameters: Value,
}

/// A request's tools, checked.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    /// As sent (what the template is given).
    pub tools: Vec<Value>,
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
}

/// Why `tools` or `tool_choice` cannot be used; the API answers 400 naming `param`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    pub param: &'static str,
    pub message: String,
}

fn error(param: &'static str, message: impl Into<String>) -> ToolError {
    ToolError { param, message: message.into() }
}

impl ToolRequest {
    /// Checks `tools` and `tool_choice` as OpenAI does. `None` when there are no tools or the
    /// choice is `"none"` (the model then answers in text, and is not shown the tools).
    pub fn parse(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<Self>, ToolError> {
        let tools = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(error("tools", "tools is a list of {\"type\": \"function\", \"function\": {…}}")),
        };
        if tools.len() > TOOLS_MAX {
            return Err(error("tools", format!("at most {TOOLS_MAX} tools")));
        }
        let mut functions: Vec<Function> = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(error("tools", format!("tools[{i}].type must be \"function\"")));
            }
            let function = tool.get("function").filter(|f| f.is_object()).ok_or_else(|| error("tools", format!("tools[{i}].function is missing")))?;
            let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
            if !valid_name(name) {
                return Err(error("tools", format!("tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, not {name:?}")));
            }
            if functions.iter().any(|f| f.name == name) {
                return Err(error("tools", format!("two tools are named {name:?}")));
            }
            let parameters = match function.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object"}),
                Some(p) if p.is_object() => p.clone(),
                Some(_) => return Err(error("tools", format!("tools[{i}].function.parameters must be a JSON schema object"))),
            };
            functions.push(Function { name: name.to_string(), parameters });
        }
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => return Err(error("tool_choice", format!("tool_choice is \"auto\", \"none\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\"}}}}, not {other:?}"))),
            },
            Some(object) => {
                let name = object
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| object.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| error("tool_choice", "tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\": …}}"))?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(error("tool_choice", format!("tool_choice names {name:?}, which is not among the tools")));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if functions.is_empty() {
            return match choice {
                ToolChoice::Auto | ToolChoice::None => Ok(None),
                _ => Err(error("tool_choice", "tool_choice asks for a call but no tools are given")),
            };
        }
        if choice == ToolChoice::None {
            return Ok(None);
        }
        Ok(Some(Self { tools, functions, choice }))
    }

    /// A call must be made (`"required"` or a named function).
    pub fn forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_))
    }

    /// The functions a call may name.
    fn callable(&self) -> impl Iterator<Item = &Function> {
        self.functions.iter().filter(move |f| match &self.choice {
            ToolChoice::Named(name) => &f.name == name,
            _ => true,
        })
    }

    /// The JSON schema of one call in `format`'s keys: the name, then arguments valid under
    /// that function's schema (properties in that order, which the grammar keeps).
    fn call_schema(&self, format: ToolFormat) -> Value {
        let key = format.arguments_key();
        let calls: Vec<Value> = self
            .callable()
            .map(|f| {
                json!({"type": "object", "properties": {"name": {"const": f.name}, key: f.parameters},
                       "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        if calls.len() == 1 {
            calls.into_iter().next().expect("one")
        } else {
            json!({"anyOf": calls})
        }
    }

    /// The schema the answer is held to, if any: a forced call (the call itself, or for the
    /// generic format `{"tool_call": call}`), or for the generic format a call or a text
    /// response. `None` leaves the model free (it then writes its family's syntax).
    pub fn grammar_schema(&self, format: ToolFormat) -> Option<Value> {
        let call = self.call_schema(format);
        match (format, self.forced()) {
            (ToolFormat::Generic, forced) => {
                let wrapped = json!({"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"], "additionalProperties": false});
                if forced {
                    Some(wrapped)
                } else {
                    let response = json!({"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"], "additionalProperties": false});
                    Some(json!({"anyOf": [wrapped, response]}))
                }
            }
            (_, true) => Some(call),
            (_, false) => None,
        }
    }

    /// For the generic format: the system text that shows the model its tools and the
    /// answer's shape.
    pub fn generic_system_text(&self) -> String {
        let tools: Vec<Value> = self
            .callable()
            .map(|f| {
                let description = self
                    .tools
                    .iter()
                    .filter_map(|t| t.get("function"))
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(&f.name))
                    .and_then(|t| t.get("description"))
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({"name": f.name, "description": description, "parameters": f.parameters})
            })
            .collect();
        let tools = serde_json::to_string_pretty(&tools).unwrap_or_default();
        let answer = if self.forced() {
            "Respond with a JSON object that calls one of them: {\"tool_call\": {\"name\": <the tool's name>, \"arguments\": <its arguments>}}."
        } else {
            "Respond with a JSON object: either {\"tool_call\": {\"name\": <the tool's name>, \"arguments\": <its arguments>}} to call a tool, \
             or {\"response\": <your answer>} to answer directly."
        };
        format!("You can call these tools:\n{tools}\n{answer}")
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= TOOL_NAME_BYTES_MAX && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The conversation as the template is given it for `format`: assistant tool calls and tool
/// results stay structured for templates that render them; for the generic format the
/// assistant's calls become the JSON it is asked to write, and the tools are described in a
/// system message (added first, or put before the first one's text).
pub fn messages_for_template(mut messages: Vec<ChatMessage>, request: &ToolRequest, format: ToolFormat) -> Vec<ChatMessage> {
    if format != ToolFormat::Generic {
        return messages;
    }
    for m in messages.iter_mut() {
        if let Some(calls) = m.tool_calls.take() {
            let text: Vec<String> = calls
                .iter()
                .map(|c| json!({"tool_call": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}).to_string())
                .collect();
            m.content = if m.content.is_empty() { text.join("\n") } else { format!("{}\n{}", m.content, text.join("\n")) };
        }
    }
    let system = request.generic_system_text();
    match messages.first_mut().filter(|m| m.role == "system") {
        Some(first) => first.content = format!("{}\n\n{system}", first.content),
        None => messages.insert(0, ChatMessage::new("system", system)),
    }
    messages
}

/// OpenAI sends a call's arguments as a JSON string; templates read them as an object (HF
/// and llama.cpp hand them so). Text that is not a JSON object stays a string.
pub fn arguments_for_template(arguments: &Value) -> Value {
    match arguments {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => arguments.clone(),
        },
        other => other.clone(),
    }
}

/// A piece of the answer as the client receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolDelta {
    Content(String),
    /// A call begins: its index among the answer's calls, id, name, and its first arguments
    /// text (possibly all of it).
    Call { index: usize, id: String, name: String, arguments: String },
    /// More of call `index`'s arguments text.
    Arguments { index: usize, fragment: String },
}

/// Turns an answer's text into content and tool calls, as it is generated.
#[derive(Debug)]
pub struct ToolStream {
    format: ToolFormat,
    forced: bool,
    /// The answer so far.
    text: String,
    /// Bytes of `text` released as content or arguments.
    released: usize,
    /// Auto mode: the text is (or may become) calls, so it is held until the end.
    holding: bool,
    /// Forced mode: where the arguments start, once the call's name is known.
    arguments_at: Option<usize>,
    calls: usize,
}

impl ToolStream {
    pub fn new(format: ToolFormat, forced: bool) -> Self {
        Self { format, forced, text: String::new(), released: 0, holding: false, arguments_at: None, calls: 0 }
    }

    /// True once a call was released: the answer's `finish_reason` is then `tool_calls`.
    pub fn made_calls(&self) -> bool {
        self.calls > 0
    }

    /// Adds generated text; returns what can be shown now.
    pub fn push(&mut self, piece: &str) -> Vec<ToolDelta> {
        self.text.push_str(piece);
        if self.forced {
            return self.push_forced();
        }
        if self.holding {
            return Vec::new();
        }
        let pending = &self.text[self.released..];
        let safe = match self.format {
            ToolFormat::Generic => 0,
            ToolFormat::Hermes => match pending.find(HERMES_OPEN) {
                Some(at) => {
                    self.holding = true;
                    at
                }
                None => pending.len() - partial_suffix(pending, HERMES_OPEN),
            },
            ToolFormat::Llama3 | ToolFormat::Mistral => {
                let opening = if self.format == ToolFormat::Llama3 { '{' } else { '[' };
                match (self.released, pending.trim_start().chars().next()) {
                    (0, None) => 0,
                    (0, Some(c)) if c == opening => {
                        self.holding = true;
                        0
                    }
                    _ => pending.len(),
                }
            }
        };
        if self.format == ToolFormat::Generic {
            self.holding = true;
        }
        self.release_content(safe)
    }

    /// The end of the answer: releases what was held, parsed into calls where it is calls.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        if self.forced {
            let mut out = self.push_forced();
            if let Some(at) = self.arguments_at {
                let start = self.released.max(at);
                let rest = self.text[start..].trim_end();
                let closing = if self.format == ToolFormat::Generic { "}}" } else { "}" };
                let rest = rest.strip_suffix(closing).unwrap_or(rest);
                if !rest.is_empty() {
                    out.push(ToolDelta::Arguments { index: 0, fragment: rest.to_string() });
                }
                self.released = self.text.len();
            } else {
                // Cut before the name was complete: what there is, as content.
                let len = self.text.len() - self.released;
                out.extend(self.release_content(len));
            }
            return out;
        }
        let held = self.text[self.released..].to_string();
        self.released = self.text.len();
        let calls = match self.format {
            ToolFormat::Hermes => parse_hermes(&held),
            ToolFormat::Llama3 => parse_json_call(held.trim(), "parameters").map(|c| (String::new(), vec![c], String::new())),
            ToolFormat::Mistral => parse_call_list(held.trim()).map(|c| (String::new(), c, String::new())),
            ToolFormat::Generic => match serde_json::from_str::<Value>(held.trim()) {
                Ok(Value::Object(o)) if o.contains_key("tool_call") => {
                    parse_call_value(&o["tool_call"], "arguments").map(|c| (String::new(), vec![c], String::new()))
                }
                Ok(Value::Object(o)) if o.get("response").is_some_and(Value::is_string) => {
                    let text = o["response"].as_str().unwrap_or_default().to_string();
                    return if text.is_empty() { Vec::new() } else { vec![ToolDelta::Content(text)] };
                }
                _ => None,
            },
        };
        let Some((before, calls, after)) = calls else {
            return if held.is_empty() { Vec::new() } else { vec![ToolDelta::Content(held)] };
        };
        let mut out = Vec::new();
        if !before.trim().is_empty() {
            out.push(ToolDelta::Content(before));
        }
        for (name, arguments) in calls {
            out.push(ToolDelta::Call { index: self.calls, id: call_id(self.format), name, arguments });
            self.calls += 1;
        }
        if !after.trim().is_empty() {
            out.push(ToolDelta::Content(after));
        }
        out
    }

    fn release_content(&mut self, len: usize) -> Vec<ToolDelta> {
        if len == 0 {
            return Vec::new();
        }
        let piece = self.text[self.released..self.released + len].to_string();
        self.released += len;
        vec![ToolDelta::Content(piece)]
    }

    /// A forced call is `{"name": "f", "<key>": <arguments>}` (inside `{"tool_call": …}` for
    /// the generic format), compact and in that order (the grammar's): the call opens once
    /// the name is complete, and its arguments stream as they come, less the closing braces
    /// (held until the end).
    fn push_forced(&mut self) -> Vec<ToolDelta> {
        let key = format!("\"{}\": ", self.format.arguments_key());
        let mut out = Vec::new();
        if self.arguments_at.is_none() {
            let Some(at) = self.text.find(&key) else { return out };
            let head = &self.text[..at];
            let name = head.rsplit_once("\"name\": \"").map(|(_, n)| n.trim_end_matches([',', ' ', '"']).to_string()).unwrap_or_default();
            self.arguments_at = Some(at + key.len());
            self.released = at + key.len();
            out.push(ToolDelta::Call { index: 0, id: call_id(self.format), name, arguments: String::new() });
            self.calls = 1;
        }
        // Hold back what may be the closing braces.
        let hold = if self.format == ToolFormat::Generic { 2 } else { 1 };
        let end = self.text.len().saturating_sub(hold).max(self.released);
        let end = (self.released..=end).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(self.released);
        if end > self.released {
            out.push(ToolDelta::Arguments { index: 0, fragment: self.text[self.released..end].to_string() });
            self.released = end;
        }
        out
    }
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

/// Bytes at the end of `text` that could begin `pattern` (held back until they can't).
fn partial_suffix(text: &str, pattern: &str) -> usize {
    (1..pattern.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && pattern.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// `<tool_call>{…}</tool_call>` blocks: the text before the first, the calls, the text after
/// the last. None when a block does not hold a call.
fn parse_hermes(text: &str) -> Option<(String, Vec<(String, String)>, String)> {
    let first = text.find(HERMES_OPEN)?;
    let before = text[..first].to_string();
    let mut rest = &text[first..];
    let mut calls = Vec::new();
    while let Some(open) = rest.find(HERMES_OPEN) {
        if !rest[..open].trim().is_empty() {
            break;
        }
        let body = &rest[open + HERMES_OPEN.len()..];
        let (inside, after) = match body.find(HERMES_CLOSE) {
            Some(close) => (&body[..close], &body[close + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(parse_json_call(inside.trim(), "arguments")?);
        rest = after;
    }
    Some((before, calls, rest.to_string()))
}

/// One call written as a JSON object with `name` and `arguments_key` (either key is taken).
fn parse_json_call(text: &str, arguments_key: &str) -> Option<(String, String)> {
    let text = text.strip_prefix("<|python_tag|>").unwrap_or(text);
    parse_call_value(&serde_json::from_str::<Value>(text).ok()?, arguments_key)
}

fn parse_call_value(value: &Value, arguments_key: &str) -> Option<(String, String)> {
    let object: &Map<String, Value> = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_string();
    let arguments = object.get(arguments_key).or_else(|| object.get("arguments")).or_else(|| object.get("parameters"))?;
    let arguments = match arguments {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some((name, arguments))
}

/// Mistral's `[{"name", "arguments"}, …]`.
fn parse_call_list(text: &str) -> Option<Vec<(String, String)>> {
    let text = text.strip_prefix("[TOOL_CALLS]").unwrap_or(text);
    let list = serde_json::from_str::<Value>(text).ok()?;
    let calls: Option<Vec<_>> = list.as_array()?.iter().map(|c| parse_call_value(c, "arguments")).collect();
    calls.filter(|c| !c.is_empty())
}

/// A call's id: `call_` and 24 random alphanumerics, as OpenAI's look; for Mistral exactly 9
/// alphanumerics, which its template demands when the call is sent back.
fn call_id(format: ToolFormat) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut random = |n: usize| -> String { (0..n).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect() };
    match format {
        ToolFormat::Mistral => random(9),
        _ => format!("call_{}", random(24)),
    }
}

/// Gathers deltas into the non-streamed message's content and `tool_calls`.
pub fn assemble(deltas: Vec<ToolDelta>) -> (String, Vec<Value>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for delta in deltas {
        match delta {
            ToolDelta::Content(text) => content.push_str(&text),
            ToolDelta::Call { id, name, arguments, .. } => calls.push((id, name, arguments)),
            ToolDelta::Arguments { index, fragment } => {
                if let Some(call) = calls.get_mut(index) {
                    call.2.push_str(&fragment);
                }
            }
        }
    }
    let calls = calls
        .into_iter()
        .map(|(id, name, arguments)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}))
        .collect();
    (content, calls)
}

/// A delta as the streamed chunk's `delta` object.
pub fn delta_json(delta: &ToolDelta) -> Value {
    match delta {
        ToolDelta::Content(text) => json!({"content": text}),
        ToolDelta::Call { index, id, name, arguments } => json!({"tool_calls": [{
            "index": index, "id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}),
        ToolDelta::Arguments { index, fragment } => json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: ToolFormat, forced: bool, pieces: &[&str]) -> (Vec<ToolDelta>, String, Vec<Value>) {
        let mut stream = ToolStream::new(format, forced);
        let mut deltas = Vec::new();
        for p in pieces {
            deltas.extend(stream.push(p));
        }
        deltas.extend(stream.finish());
        let (content, calls) = assemble(deltas.clone());
        (deltas, content, calls)
    }

    #[test]
    fn hermes_calls_after_text_are_parsed_and_the_text_streams_first() {
        let (deltas, content, calls) = run(
            ToolFormat::Hermes,
            false,
            &["Let me check.", " <tool", "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", "\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>"],
        );
        assert_eq!(deltas[0], ToolDelta::Content("Let me check.".into()), "text before the call streams at once");
        assert_eq!(content.trim(), "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Paris"}));
        assert_eq!(calls[1]["function"]["name"], "t");
        // A tag-like text that is not a call stays content.
        let (_, content, calls) = run(ToolFormat::Hermes, false, &["use <tool_call>not json</tool_call> here"]);
        assert!(calls.is_empty());
        assert_eq!(content, "use <tool_call>not json</tool_call> here");
        // Text that may begin a call's tag is held only until it cannot.
        let (deltas, ..) = run(ToolFormat::Hermes, false, &["a <to", "ol> c"]);
        assert_eq!(deltas, [ToolDelta::Content("a ".into()), ToolDelta::Content("<tool> c".into())]);
    }

    #[test]
    fn llama3_and_mistral_json_calls_are_parsed_and_text_passes() {
        let (_, content, calls) = run(ToolFormat::Llama3, false, &[" {\"name\": \"f\", ", "\"parameters\": {\"x\": 1}}"]);
        assert_eq!((content.as_str(), calls[0]["function"]["name"].as_str()), ("", Some("f")));
        assert_eq!(calls[0]["function"]["arguments"], "{\"x\":1}");
        let (deltas, content, calls) = run(ToolFormat::Llama3, false, &["Hello", " there"]);
        assert!(calls.is_empty());
        assert_eq!((deltas.len(), content.as_str()), (2, "Hello there"));
        let (_, _, calls) = run(ToolFormat::Mistral, false, &["[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {\"k\": \"v\"}}]"]);
        assert_eq!(calls.len(), 2);
        let (_, content, calls) = run(ToolFormat::Mistral, false, &["[1, 2]"]);
        assert!(calls.is_empty());
        assert_eq!(content, "[1, 2]");
    }

    #[test]
    fn a_forced_call_streams_its_arguments_as_they_come() {
        let pieces = ["{\"name\": \"get_w", "eather\", \"arguments\": {\"ci", "ty\": \"Paris\", \"days\": 3}", "}"];
        let (deltas, content, calls) = run(ToolFormat::Hermes, true, &pieces);
        assert!(content.is_empty());
        assert!(matches!(&deltas[0], ToolDelta::Call { name, arguments, .. } if name == "get_weather" && arguments.is_empty()));
        assert!(deltas.len() >= 3, "{deltas:?}");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Paris\", \"days\": 3}");
        let generic = ["{\"tool_call\": {\"name\": \"f\", \"arguments\": {\"a\": [1]}}}"];
        let (_, _, calls) = run(ToolFormat::Generic, true, &generic);
        assert_eq!((calls[0]["function"]["name"].as_str(), calls[0]["function"]["arguments"].as_str()), (Some("f"), Some("{\"a\": [1]}")));
    }

    #[test]
    fn the_generic_format_answers_text_or_a_call() {
        let (_, content, calls) = run(ToolFormat::Generic, false, &["{\"response\": \"It is ", "sunny.\"}"]);
        assert_eq!((content.as_str(), calls.len()), ("It is sunny.", 0));
        let (_, _, calls) = run(ToolFormat::Generic, false, &["{\"tool_call\": {\"name\": \"f\", \"arguments\": {}}}"]);
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
        let parse = |tools: Value, choice: Value| ToolRequest::parse(Some(&tools), Some(&choice));
        assert!(parse(json!([tool]), json!("auto")).unwrap().is_some());
        assert!(parse(json!([tool]), json!("none")).unwrap().is_none());
        assert!(parse(json!([tool]), json!("required")).unwrap().unwrap().forced());
        assert_eq!(parse(json!([tool]), json!({"type": "function", "function": {"name": "g"}})).unwrap_err().param, "tool_choice");
        assert_eq!(parse(json!([]), json!("required")).unwrap_err().param, "tool_choice");
        assert_eq!(parse(json!([{"type": "function", "function": {"name": "bad name"}}]), json!("auto")).unwrap_err().param, "tools");
        assert_eq!(parse(json!([tool, tool]), json!("auto")).unwrap_err().param, "tools");
        assert_eq!(parse(json!("x"), json!("auto")).unwrap_err().param, "tools");
        assert_eq!(parse(json!([tool]), json!("sometimes")).unwrap_err().param, "tool_choice");
    }
}
