//! `scripts/install-ca.sh`, the one-command client setup, against throwaway
//! copies of each distribution's files (REGMIRROR_ROOT), fetching from a
//! running regmirror: it installs, is idempotent, keeps backups, and
//! `--undo` puts every file back as it was.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

mod standalone;

/// Every file under `root` (path → content), for before/after comparisons.
fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn run(root: &Path, shims: &Path, args: &[&str]) -> String {
    let out = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-ca.sh"))
        .args(args)
        .env("REGMIRROR_ROOT", root)
        .env(
            "PATH",
            format!("{}:{}", shims.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install-ca.sh {args:?} failed: {said}");
    said
}

#[test]
fn install_ca_on_each_layout_is_idempotent_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.3.252:5000";
    let cfg = standalone::write_config(dir.path(), addr, &["registry-1.docker.io", "index.docker.io"]);
    let _regmirror = standalone::spawn(&cfg, &[], std::process::Stdio::null());
    standalone::wait_listening(addr);
    let ca = std::fs::read(dir.path().join("certs/ca.pem")).unwrap();
    let url = format!("http://{addr}");
    let names = ["registry-1.docker.io", "index.docker.io", "regmirror.test"];

    for (distro, os_release, anchor, update) in [
        (
            "debian",
            "ID=debian\n",
            "usr/local/share/ca-certificates/regmirror.crt",
            "update-ca-certificates",
        ),
        (
            "ubuntu",
            "ID=ubuntu\nID_LIKE=debian\n",
            "usr/local/share/ca-certificates/regmirror.crt",
            "update-ca-certificates",
        ),
        (
            "fedora",
            "ID=fedora\n",
            "etc/pki/ca-trust/source/anchors/regmirror.crt",
            "update-ca-trust",
        ),
        (
            "rocky",
            "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n",
            "etc/pki/ca-trust/source/anchors/regmirror.crt",
            "update-ca-trust",
        ),
        (
            "alpine",
            "ID=alpine\n",
            "usr/local/share/ca-certificates/regmirror.crt",
            "update-ca-certificates",
        ),
    ] {
        let machine = tempfile::tempdir().unwrap();
        let root = machine.path().join("root");
        let shims = machine.path().join("shims");
        std::fs::create_dir_all(root.join("etc/docker/certs.d/registry-1.docker.io")).unwrap();
        std::fs::create_dir_all(&shims).unwrap();
        std::fs::write(root.join("etc/os-release"), os_release).unwrap();
        std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        // A certificate the machine already had: backed up, then put back.
        std::fs::write(root.join("etc/docker/certs.d/registry-1.docker.io/ca.crt"), "OLD").unwrap();
        let calls = machine.path().join("calls");
        for tool in ["update-ca-certificates", "update-ca-trust"] {
            let shim = shims.join(tool);
            std::fs::write(
                &shim,
                format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", calls.display()),
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let before = snapshot(&root);

        for round in 0..2 {
            run(&root, &shims, &[&url, "--hosts", "10.9.8.7"]);
            assert_eq!(
                std::fs::read(root.join(anchor)).unwrap(),
                ca,
                "{distro}: system trust anchor"
            );
            for n in names {
                for base in ["etc/containers/certs.d", "etc/docker/certs.d"] {
                    let f = root.join(base).join(n).join("ca.crt");
                    assert_eq!(std::fs::read(&f).unwrap(), ca, "{distro}: {}", f.display());
                }
            }
            let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
            assert!(hosts.starts_with("127.0.0.1 localhost\n"), "{distro}: {hosts}");
            assert_eq!(
                hosts
                    .matches("10.9.8.7 registry-1.docker.io index.docker.io regmirror.test")
                    .count(),
                1,
                "{distro} round {round}: one hosts line, however often it runs:\n{hosts}"
            );
            let called = std::fs::read_to_string(&calls).unwrap();
            assert_eq!(called.lines().count(), round + 1, "{distro}: {called}");
            assert!(called.starts_with(update), "{distro}: ran {called}");
        }

        run(&root, &shims, &["--undo"]);
        let after = snapshot(&root);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "{distro}: --undo leaves exactly the files that were there"
        );
        assert_eq!(after, before, "{distro}: --undo restores every file's content");
        assert!(
            std::fs::read_to_string(&calls).unwrap().lines().count() == 3,
            "{distro}: the trust store is refreshed after undo too"
        );
    }
}
