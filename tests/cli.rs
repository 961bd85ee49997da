//! The command line as an operator uses it: check, ca export, setup.

use std::process::Command;

mod standalone;

fn regmirror(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_default_config_and_names_the_bad_key() {
    let (ok, out, _) = regmirror(&["check"]);
    assert!(ok);
    assert!(out.contains("3 upstream(s)"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = include_str!("../config.toml").replace("max_size", "max_sizee");
    std::fs::write(&path, text).unwrap();
    let (ok, _, err) = regmirror(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("max_sizee"), "{err}");

    let text = include_str!("../config.toml").replace("\"https://quay.io\"", "\"quay.io\"");
    std::fs::write(&path, text).unwrap();
    let (ok, _, err) = regmirror(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("upstream[2].url"), "{err}");

    let text = include_str!("../config.toml").replace(
        "namespace = \"quay\"",
        "namespace = \"quay\"\nimmutable_tags = ['^v(\\d+']",
    );
    std::fs::write(&path, text).unwrap();
    let (ok, _, err) = regmirror(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("upstream[2].immutable_tags[0]") && err.contains("not a regular expression"),
        "{err}"
    );
}

#[test]
fn ca_export_prints_the_same_root_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let text =
        include_str!("../config.toml").replace("dir = \"certs\"", &format!("dir = \"{}/certs\"", dir.path().display()));
    std::fs::write(&path, text).unwrap();
    let (ok, first, err) = regmirror(&["ca", "export", "--config", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(first.starts_with("-----BEGIN CERTIFICATE-----"));
    let (_, second, _) = regmirror(&["ca", "export", "--config", path.to_str().unwrap()]);
    assert_eq!(first, second);
    assert!(!first.contains("PRIVATE KEY"));
}

#[test]
fn setup_writes_client_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, _, err) = regmirror(&["setup", "containerd", "--proxy", "10.9.8.7", "--write", out]);
    assert!(ok, "{err}");
    let toml = std::fs::read_to_string(dir.path().join("etc/containerd/certs.d/quay.io/hosts.toml")).unwrap();
    assert!(toml.contains("http://10.9.8.7:5000"), "{toml}");
    let (ok, _, err) = regmirror(&["setup", "hosts"]);
    assert!(!ok && err.contains("--proxy"), "{err}");
}

#[test]
fn check_reports_a_ca_that_no_longer_covers_the_configured_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let base =
        include_str!("../config.toml").replace("dir = \"certs\"", &format!("dir = \"{}/certs\"", dir.path().display()));
    std::fs::write(&path, &base).unwrap();
    let (ok, _, err) = regmirror(&["ca", "export", "--config", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    let grown = base.replace(
        "hosts = [\"quay.io\"]",
        "hosts = [\"quay.io\", \"registry.example.org\"]",
    );
    std::fs::write(&path, grown).unwrap();
    let (ok, _, err) = regmirror(&["check", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("registry.example.org"), "{err}");
}

/// `--log-format json`: every log line is one JSON object a log shipper can
/// read, with the message and its fields.
#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = standalone::write_config(dir.path(), "127.0.3.251:5000", &["registry-1.docker.io"]);
    let mut serving = standalone::spawn(&cfg, &["--log-format", "json"], std::process::Stdio::piped());
    let lines = standalone::stderr_until_ready(&mut serving.0);
    drop(serving);
    assert!(lines.iter().any(|l| l.contains("listener ready")), "{lines:#?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["message"].is_string() && v["level"].is_string(), "{l}");
    }
    let ready: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(ready["addr"], "127.0.3.251:5000", "fields are top-level keys");
}

/// The systemd unit in scripts/ is one systemd accepts (`systemd-analyze
/// verify`), runs the binary without root but with CAP_NET_BIND_SERVICE, and
/// keeps its store and CA in a state directory.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/regmirror.service")).unwrap();
    for needed in [
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "StateDirectory=regmirror",
        "Restart=on-failure",
        "DynamicUser=yes",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regmirror.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/regmirror", env!("CARGO_BIN_EXE_regmirror")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// `serve` raises its soft `RLIMIT_NOFILE` to the hard limit (a service
/// started with 512 still takes thousands of connections when allowed),
/// and warns when even the hard limit is short of what
/// `limits.max_connections` (4,096 by default) needs.
#[test]
fn serve_raises_the_descriptor_limit_and_warns_when_it_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = standalone::write_config(dir.path(), "127.0.3.248:5000", &["registry-1.docker.io"]);
    let child = Command::new("prlimit")
        .arg("--nofile=512:2048")
        .arg(env!("CARGO_BIN_EXE_regmirror"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("prlimit regmirror serve");
    let mut serving = standalone::Serving(child);
    let pid = serving.0.id();
    let lines = standalone::stderr_until_ready(&mut serving.0);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    drop(serving);
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(
        open_files,
        ["2048", "2048"],
        "soft limit raised to the hard one:\n{limits}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("RLIMIT_NOFILE (2048) is below") && l.contains("4352")),
        "no warning about the descriptor limit:\n{lines:#?}"
    );
}
