//! End to end with the official `openai` Python SDK as the client.
//!
//! Needs a Python with `openai` installed: `RELAYGATE_PYTHON`, else
//! `.venv/bin/python` in the repo (what `.ci/run` creates), else `python3`.
//! Without it the test fails with instructions; set `RELAYGATE_SKIP_SDK=1`
//! to skip it on purpose.

use relaygate::sim::{Faults, Sim};

use crate::common::*;

#[tokio::test]
async fn the_official_python_sdk_works_through_relaygate() {
    let Some(python) = sdk_python() else { return };
    let probe = tokio::process::Command::new(&python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output()
        .await;
    let version = match probe {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => panic!(
            "{} cannot import openai: run `python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt`, \
             set RELAYGATE_PYTHON, or set RELAYGATE_SKIP_SDK=1 to skip this test",
            python.display()
        ),
    };
    eprintln!("openai SDK {version}");

    let healthy = Sim::start("a", Faults::default()).await.unwrap();
    let broken = Sim::start(
        "b",
        Faults {
            reset_after: Some(3),
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let mut config = config_for(&[("a", &healthy), ("b", &broken)]);
    config.push_str("\n[[models]]\nname = \"broken-stream\"\ntargets = [{ upstream = \"b\" }]\n");
    let gw = Gateway::start(&config, &[]).await;

    let stdout = run_sdk_script(&python, "openai_sdk.py", &gw, &[]).await;
    assert!(stdout.contains("ALL OK"), "{stdout}");
    // The SDK's requests really went through: 3 chat calls on `a`, one broken stream on `b`.
    assert_eq!(healthy.stats().requests, 3);
    assert_eq!(broken.stats().streams_opened, 1);
}
