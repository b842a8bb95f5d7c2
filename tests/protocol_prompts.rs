//! System prompts rendered from prompts/, the parse-error report and the result write-back.

use serde_json::{Value, json};
use vlad::action::Action;
use vlad::protocol::render::{
    PromptContext, PromptKind, Prompts, RenderError, ResultPart, Segment, ToolSpec, result_segments,
};
use vlad::protocol::{ActionSpace, MarkerStyle, ModelFamily, Protocol};

fn weather_tool() -> ToolSpec {
    ToolSpec {
        name: "get_weather".into(),
        description: "The weather in a city.".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    }
}

/// The JSON after `Parameters: ` on each tool line of a prompt.
fn schemas(prompt: &str) -> Vec<Value> {
    prompt
        .lines()
        .filter_map(|l| l.split_once(" Parameters: "))
        .filter_map(|(_, rest)| rest.strip_suffix(" Format the arguments as a JSON object."))
        .map(|json| serde_json::from_str(json).unwrap_or(Value::Null))
        .collect()
}

#[test]
fn desktop_prompt_lists_the_space_and_the_tools() -> anyhow::Result<()> {
    let prompts = Prompts::builtin()?;
    let ctx = PromptContext {
        tools: vec![weather_tool()],
        ..PromptContext::default()
    };
    let prompt = prompts.system_prompt(PromptKind::Desktop, &ctx)?;
    for name in [
        "Click",
        "DoubleClick",
        "RightClick",
        "Drag",
        "Scroll",
        "Type",
        "Key",
        "Wait",
        "Finish",
        "CallUser",
        "get_weather",
    ] {
        assert!(
            prompt.contains(&format!("### {name}\n")),
            "{name} missing:\n{prompt}"
        );
    }
    assert!(!prompt.contains("### Tap"));
    assert!(prompt.contains("should be one of [Click,DoubleClick,RightClick,Drag,Scroll,Type,Key,Wait,Finish,CallUser,get_weather]"));
    let schemas = schemas(&prompt);
    assert_eq!(schemas.len(), 11, "{prompt}");
    assert!(
        schemas.iter().all(Value::is_object),
        "every schema is JSON: {schemas:?}"
    );
    assert_eq!(schemas[0]["required"], json!(["point"]));
    assert_eq!(schemas[10], weather_tool().parameters);
    Ok(())
}

#[test]
fn the_example_in_each_prompt_parses() -> anyhow::Result<()> {
    let prompts = Prompts::builtin()?;
    for (kind, style) in [
        (PromptKind::Desktop, MarkerStyle::Asterisk),
        (PromptKind::Android, MarkerStyle::Flower),
    ] {
        let ctx = PromptContext {
            markers: style,
            ..PromptContext::default()
        };
        let prompt = prompts.system_prompt(kind, &ctx)?;
        let example = prompt
            .lines()
            .skip_while(|l| *l != "For example:")
            .nth(1)
            .unwrap_or_default();
        let reply = Protocol::new(ModelFamily::Qwen2Vl).parse(example);
        assert_eq!(reply.errors, vec![], "{example}");
        assert_eq!(
            reply.actions().cloned().collect::<Vec<_>>(),
            vec![Action::Click { x: 348.0, y: 291.0 }]
        );
        assert_eq!(reply.markers, style);
        assert!(prompt.contains(&format!("{}: The tool to use", style.marker("FUNCTION"))));
    }
    Ok(())
}

#[test]
fn android_prompt_uses_the_profile_names() -> anyhow::Result<()> {
    let prompts = Prompts::builtin()?;
    let space = ActionSpace::from_names(&["Tap", "Swipe", "PressHome", "Done"])?;
    let ctx = PromptContext {
        space: Some(space),
        ..PromptContext::default()
    };
    let prompt = prompts.system_prompt(PromptKind::Android, &ctx)?;
    assert!(
        prompt.contains("should be one of [Tap,Swipe,PressHome,Done]"),
        "{prompt}"
    );
    assert!(prompt.contains("*FUNCTION*: Tap *ARGS*: {\"point\": (348,291)}"));
    assert!(prompt.contains("When the task is complete, call Done."));
    assert!(!prompt.contains("CallUser"));
    assert!(ActionSpace::from_names(&["Teleport"]).is_err());
    Ok(())
}

#[test]
fn grounding_prompt_asks_for_the_query() -> anyhow::Result<()> {
    let prompts = Prompts::builtin()?;
    let ctx = PromptContext {
        query: Some("the red button".into()),
        ..PromptContext::default()
    };
    let prompt = prompts.system_prompt(PromptKind::Grounding, &ctx)?;
    assert!(
        prompt.ends_with("Find <|object_ref_start|>the red button<|object_ref_end|>."),
        "{prompt}"
    );
    let plain = prompts.system_prompt(PromptKind::Grounding, &PromptContext::default())?;
    assert!(!plain.contains("Find"));
    Ok(())
}

#[test]
fn parse_errors_are_reported_with_their_text() -> anyhow::Result<()> {
    let prompts = Prompts::builtin()?;
    let reply =
        Protocol::new(ModelFamily::Qwen2Vl).parse("*FUNCTION*: Tap *ARGS*: {\"point\": (348,");
    let report = prompts.parse_errors(&reply.errors, reply.markers)?;
    assert_eq!(
        report,
        "Your reply could not be carried out:\n- the arguments of Tap could not be read: the arguments end before they are complete (was the reply cut off?) (in: *FUNCTION*: Tap *ARGS*: {\"point\": (348,)\nWrite each call as *FUNCTION*: Name *ARGS*: {\"argument\": value}, with points as (x, y) from 0 to 1000."
    );
    Ok(())
}

#[test]
fn prompts_from_a_directory_override_and_fail_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("desktop.j2"),
        "Functions: {{ functions | map(attribute='name') | join(' ') }}",
    )?;
    let prompts = Prompts::from_dir(dir.path())?;
    let ctx = PromptContext {
        space: Some(ActionSpace::from_names(&["Click", "Type"])?),
        ..PromptContext::default()
    };
    assert_eq!(
        prompts.system_prompt(PromptKind::Desktop, &ctx)?,
        "Functions: Click Type"
    );
    // Files not in the directory come from the built-in set.
    assert!(
        prompts
            .system_prompt(PromptKind::Android, &PromptContext::default())?
            .contains("Android")
    );

    std::fs::write(dir.path().join("desktop.j2"), "{{ no_such_variable }}")?;
    let prompts = Prompts::from_dir(dir.path())?;
    let error = prompts.system_prompt(PromptKind::Desktop, &ctx);
    assert!(
        matches!(error, Err(RenderError::Template { ref name, .. }) if name == "desktop.j2"),
        "{error:?}"
    );

    std::fs::write(dir.path().join("desktop.j2"), "{% if %}")?;
    assert!(matches!(
        Prompts::from_dir(dir.path()),
        Err(RenderError::Template { .. })
    ));
    std::fs::remove_file(dir.path().join("desktop.j2"))?;
    std::fs::write(dir.path().join("functions.json"), "{")?;
    assert!(matches!(
        Prompts::from_dir(dir.path()),
        Err(RenderError::Docs { .. })
    ));
    Ok(())
}

#[test]
fn results_go_back_inside_the_assistant_turn() {
    let turn = "I need the home screen.\n*FUNCTION*: Home *ARGS*: {}\n";
    let segments = result_segments(turn, MarkerStyle::Asterisk, &[ResultPart::Image]);
    assert_eq!(
        segments,
        vec![
            Segment::Text("*RESULT*: ".into()),
            Segment::Image,
            Segment::Text("\n*RETURN*:".into())
        ]
    );
    // The continued turn still parses: the result marker ends what the parser reads.
    let mut continued = turn.to_string();
    for segment in &segments {
        if let Segment::Text(t) = segment {
            continued.push_str(t);
        }
    }
    let reply = Protocol::new(ModelFamily::Qwen2Vl).parse(&continued);
    assert_eq!(
        reply.actions().cloned().collect::<Vec<_>>(),
        vec![Action::Home]
    );
    assert_eq!(continued.get(..reply.turn_end), Some(turn));
}

#[test]
#[ignore = "prints the rendered prompts for reading"]
fn show_prompts() -> anyhow::Result<()> {
    let prompts = Prompts::builtin()?;
    let ctx = PromptContext {
        tools: vec![weather_tool()],
        ..PromptContext::default()
    };
    println!(
        "{}\n-----",
        prompts.system_prompt(PromptKind::Desktop, &ctx)?
    );
    println!(
        "{}\n-----",
        prompts.system_prompt(PromptKind::Android, &PromptContext::default())?
    );
    Ok(())
}
