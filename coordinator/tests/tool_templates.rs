//! Tool use through the chat templates the model families ship (tests/fixtures/chat-templates):
//! each template is recognised as its family, shows the model the tools, renders a call and
//! its result, and the call as the template writes it (what the model was trained to write)
//! parses back into the same OpenAI tool call. A forced call's opening is the template's own.

use potluck_coordinator::tools::{assemble, ToolFormat, ToolStream};
use potluck_engine::chat_template::{ChatMessage, ChatTemplate};
use serde_json::{json, Value};

struct Case {
    file: &'static str,
    format: ToolFormat,
    bos: &'static str,
    eos: &'static str,
    /// What ends an assistant turn in this template (not part of what the model writes).
    end_of_turn: &'static [&'static str],
    /// What the template writes before a call (Qwen 3's empty thinking block): the model
    /// writes it too, and it comes back as content.
    before_call: &'static str,
}

const CASES: &[Case] = &[
    Case { file: "Qwen-Qwen2.5-7B-Instruct", format: ToolFormat::Hermes, bos: "", eos: "<|im_end|>", end_of_turn: &["<|im_end|>"], before_call: "" },
    Case {
        file: "Qwen-Qwen3-0.6B",
        format: ToolFormat::Hermes,
        bos: "",
        eos: "<|im_end|>",
        end_of_turn: &["<|im_end|>"],
        before_call: "<think>\n\n</think>\n\n",
    },
    Case {
        file: "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        format: ToolFormat::Hermes,
        bos: "<|begin_of_text|>",
        eos: "<|im_end|>",
        end_of_turn: &["<|im_end|>"],
        before_call: "",
    },
    Case {
        file: "meta-llama-Llama-3.1-8B-Instruct",
        format: ToolFormat::Llama3,
        bos: "<|begin_of_text|>",
        eos: "<|eot_id|>",
        end_of_turn: &["<|eot_id|>", "<|eom_id|>"],
        before_call: "",
    },
    Case { file: "mistralai-Mistral-Nemo-Instruct-2407", format: ToolFormat::Mistral, bos: "<s>", eos: "</s>", end_of_turn: &["</s>"], before_call: "" },
];

fn template(case: &Case) -> ChatTemplate {
    let path = format!("{}/../tests/fixtures/chat-templates/{}.jinja", env!("CARGO_MANIFEST_DIR"), case.file);
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    ChatTemplate::new(&source, case.bos, case.eos).unwrap()
}

fn tools() -> Vec<Value> {
    vec![json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}}})]
}

fn question() -> ChatMessage {
    ChatMessage::new("user", "What will the weather be in Paris for 3 days?")
}

/// An assistant turn that calls the tool (arguments as an object, as templates read them).
fn call() -> ChatMessage {
    let mut m = ChatMessage::new("assistant", "");
    m.tool_calls = Some(vec![json!({"id": "abc123def", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}})]);
    m
}

fn result() -> ChatMessage {
    let mut m = ChatMessage::new("tool", "{\"forecast\": \"sunny, 21 C\"}");
    m.tool_call_id = Some("abc123def".into());
    m.name = Some("get_weather".into());
    m
}

#[test]
fn each_family_is_recognised_and_sees_its_tools_calls_and_results() {
    for case in CASES {
        let t = template(case);
        assert_eq!(ToolFormat::detect(&t), case.format, "{}", case.file);
        let text = t.render_with_tools(&[question(), call(), result()], Some(&tools()), true).unwrap();
        for shown in ["get_weather", "The weather forecast for a city", "sunny, 21 C", "Paris"] {
            assert!(text.contains(shown), "{}: the prompt lacks {shown:?}:\n{text}", case.file);
        }
    }
}

#[test]
fn a_call_as_the_template_writes_it_parses_back() {
    for case in CASES {
        let t = template(case);
        let asked = t.render_with_tools(&[question()], Some(&tools()), true).unwrap();
        let answered = t.render_with_tools(&[question(), call()], Some(&tools()), false).unwrap();
        let written = answered.strip_prefix(asked.as_str()).unwrap_or_else(|| {
            panic!("{}: the answered conversation does not extend the prompt:\n{asked}\n---\n{answered}", case.file)
        });
        let mut written = written.trim_end();
        for end in case.end_of_turn {
            written = written.strip_suffix(end).unwrap_or(written).trim_end();
        }
        // What a forced call's prompt ends with is how this template opens a call.
        let opening = format!("{}{}", case.before_call, case.format.forced_opening());
        assert!(written.starts_with(&opening), "{}: {written:?}", case.file);
        // Streamed a few characters at a time, as tokens arrive.
        let mut stream = ToolStream::new(case.format, false);
        let mut deltas = Vec::new();
        let chars: Vec<char> = written.chars().collect();
        for piece in chars.chunks(3) {
            deltas.extend(stream.push(&piece.iter().collect::<String>()));
        }
        deltas.extend(stream.finish());
        assert!(stream.made_calls(), "{}: no call parsed from {written:?}", case.file);
        let (content, calls) = assemble(deltas);
        assert_eq!(content.trim(), case.before_call.trim(), "{}", case.file);
        assert_eq!(calls.len(), 1, "{}", case.file);
        assert_eq!(calls[0]["function"]["name"], "get_weather", "{}", case.file);
        let arguments: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris", "days": 3}), "{}", case.file);
    }
}

/// The default model's template ignores `tools`: the generic format describes them instead.
#[test]
fn a_template_without_tools_is_generic() {
    let chatml = ChatTemplate::new(potluck_engine::chat_template::CHATML_TEMPLATE, "", "").unwrap();
    assert_eq!(ToolFormat::detect(&chatml), ToolFormat::Generic);
}
