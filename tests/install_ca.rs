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

/// The machine's own files seen through overlays in a private mount
/// namespace: the script runs on the real paths (`/etc`, `/usr/local/share`,
/// `/var/lib`) with the real `update-ca-certificates`, every write lands in
/// this test's throwaway upper directories, and the machine's files are
/// never changed.
struct Overlaid {
    dir: tempfile::TempDir,
}

/// What the overlays cover: the script's paths and the trust store's.
const OVERLAID: [(&str, &str); 3] = [("/etc", "etc"), ("/usr/local/share", "share"), ("/var/lib", "varlib")];

/// The files install-ca.sh may change, as seen inside the namespace.
const OWNED: &str =
    "/etc/docker /etc/containers /etc/pki /usr/local/share/ca-certificates /etc/hosts /var/lib/regmirror-client";

impl Overlaid {
    /// A machine whose `/etc/os-release` says `os_release`, with a hosts
    /// file of its own and a docker certificate it already had.
    fn new(os_release: &str) -> Overlaid {
        let dir = tempfile::tempdir().unwrap();
        for (_, name) in OVERLAID {
            std::fs::create_dir_all(dir.path().join(format!("{name}.up"))).unwrap();
            std::fs::create_dir_all(dir.path().join(format!("{name}.work"))).unwrap();
        }
        let etc = dir.path().join("etc.up");
        std::fs::write(etc.join("os-release"), os_release).unwrap();
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::create_dir_all(etc.join("docker/certs.d/registry-1.docker.io")).unwrap();
        std::fs::write(etc.join("docker/certs.d/registry-1.docker.io/ca.crt"), "OLD").unwrap();
        // RHEL's update-ca-trust is not on this machine: a stand-in that
        // records its call (Debian's update-ca-certificates runs for real).
        let shims = dir.path().join("shims");
        std::fs::create_dir_all(&shims).unwrap();
        let shim = shims.join("update-ca-trust");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho \"update-ca-trust $*\" >> '{}'\n",
                dir.path().join("calls").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        Overlaid { dir }
    }

    /// Runs `cmd` inside the namespace, the overlays mounted.
    fn run(&self, cmd: &[&str]) -> std::process::Output {
        let mut mounts = String::new();
        for (path, name) in OVERLAID {
            let d = self.dir.path();
            mounts += &format!(
                "mount -t overlay overlay -o lowerdir={path},upperdir={up},workdir={work} {path} && ",
                up = d.join(format!("{name}.up")).display(),
                work = d.join(format!("{name}.work")).display(),
            );
        }
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(format!("{mounts}exec \"$@\""))
            .arg("sh")
            .args(cmd)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.dir.path().join("shims").display(),
                    std::env::var("PATH").unwrap()
                ),
            )
            .env_remove("REGMIRROR_ROOT")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env_remove("CURL_CA_BUNDLE")
            .env_remove("NIX_SSL_CERT_FILE")
            .output()
            .unwrap()
    }

    /// `install-ca.sh ARGS` inside the namespace; what it said.
    fn install_ca(&self, args: &[&str]) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-ca.sh");
        let mut cmd = vec!["sh", script];
        cmd.extend_from_slice(args);
        let out = self.run(&cmd);
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "install-ca.sh {args:?} failed: {said}");
        said
    }

    /// A file as the namespace sees it.
    fn read(&self, path: &str) -> Vec<u8> {
        self.run(&["cat", path]).stdout
    }

    /// Path and sha256 of every file the script may change.
    fn owned_files(&self) -> String {
        let out = self.run(&[
            "sh",
            "-c",
            &format!("find {OWNED} -type f -exec sha256sum {{}} + 2>/dev/null | sort"),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// curl's exit code for `https://registry-1.docker.io/v2/` using the
    /// system trust store (0: the TLS handshake with regmirror verified;
    /// 60: the certificate is not trusted), reaching `via` directly or,
    /// when `None`, through the namespace's /etc/hosts.
    fn curl(&self, via: Option<&str>) -> i32 {
        let resolve = via.map(|ip| format!("registry-1.docker.io:443:{ip}"));
        let mut cmd = vec!["curl", "-sS", "-o", "/dev/null", "--max-time", "10"];
        if let Some(r) = &resolve {
            cmd.extend(["--resolve", r.as_str()]);
        }
        cmd.push("https://registry-1.docker.io/v2/");
        self.run(&cmd).status.code().unwrap_or(-1)
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("calls")).map_or(0, |c| c.lines().count())
    }
}

#[test]
fn install_ca_on_the_real_paths_of_each_layout_in_a_mount_namespace() {
    let ip = "127.0.10.2";
    let dir = tempfile::tempdir().unwrap();
    let http = format!("{ip}:5000");
    let cfg = standalone::write_config(dir.path(), &http, &["registry-1.docker.io", "index.docker.io"]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[server]\n", &format!("[server]\nhttps = \"{ip}:443\"\n")),
    )
    .unwrap();
    let _regmirror = standalone::spawn(&cfg, &[], std::process::Stdio::null());
    standalone::wait_listening(&http);
    standalone::wait_listening(&format!("{ip}:443"));
    let ca = std::fs::read(dir.path().join("certs/ca.pem")).unwrap();
    let url = format!("http://{http}");
    let names = ["registry-1.docker.io", "index.docker.io", "regmirror.test"];
    let real_before = snapshot(Path::new("/etc/docker"));
    assert!(
        !Path::new("/var/lib/regmirror-client").exists(),
        "this machine already ran install-ca.sh"
    );

    for (distro, os_release, anchor, system_trust) in [
        (
            "debian",
            "ID=debian\n",
            "/usr/local/share/ca-certificates/regmirror.crt",
            true,
        ),
        (
            "alpine",
            "ID=alpine\n",
            "/usr/local/share/ca-certificates/regmirror.crt",
            true,
        ),
        (
            "rhel",
            "ID=\"rhel\"\nID_LIKE=\"fedora\"\n",
            "/etc/pki/ca-trust/source/anchors/regmirror.crt",
            false,
        ),
    ] {
        let m = Overlaid::new(os_release);
        let before = m.owned_files();
        assert!(
            before.contains("/etc/hosts"),
            "{distro}: the namespace sees no /etc/hosts:\n{before}"
        );
        if system_trust {
            assert_eq!(m.curl(Some(ip)), 60, "{distro}: regmirror trusted before install");
        }
        for round in 1..=2 {
            m.install_ca(&[&url, "--hosts", ip]);
            assert_eq!(m.read(anchor), ca, "{distro}: {anchor}");
            for n in names {
                for base in ["/etc/containers/certs.d", "/etc/docker/certs.d"] {
                    let f = format!("{base}/{n}/ca.crt");
                    assert_eq!(m.read(&f), ca, "{distro}: {f}");
                }
            }
            let hosts = String::from_utf8(m.read("/etc/hosts")).unwrap();
            assert!(hosts.starts_with("127.0.0.1 localhost\n"), "{distro}: {hosts}");
            let line = format!("{ip} registry-1.docker.io index.docker.io regmirror.test");
            assert_eq!(hosts.matches(&line).count(), 1, "{distro} round {round}:\n{hosts}");
            if system_trust {
                // The names now lead to regmirror, and its certificate verifies.
                assert_eq!(m.curl(None), 0, "{distro} round {round}: curl through /etc/hosts");
            } else {
                assert_eq!(m.calls(), round, "{distro}: update-ca-trust once per run");
            }
        }
        let backup = m.read("/var/lib/regmirror-client/backup/etc/docker/certs.d/registry-1.docker.io/ca.crt");
        assert_eq!(backup, b"OLD", "{distro}: the certificate the machine had is backed up");

        m.install_ca(&["--undo"]);
        assert_eq!(
            m.owned_files(),
            before,
            "{distro}: --undo restores every file it changed"
        );
        assert_eq!(m.read("/etc/docker/certs.d/registry-1.docker.io/ca.crt"), b"OLD");
        if system_trust {
            assert_eq!(m.curl(Some(ip)), 60, "{distro}: still trusted after --undo");
        } else {
            assert_eq!(m.calls(), 3, "{distro}: the trust store is refreshed after undo too");
        }
    }
    assert_eq!(
        snapshot(Path::new("/etc/docker")),
        real_before,
        "the machine's /etc/docker changed"
    );
    assert!(
        !Path::new("/var/lib/regmirror-client").exists(),
        "the machine's /var/lib changed"
    );
    assert!(!Path::new("/usr/local/share/ca-certificates/regmirror.crt").exists());
}

/// `--connect PROXY`: besides the CA, the docker and containerd daemons get
/// systemd drop-ins and podman/skopeo/buildah a profile script setting
/// `HTTPS_PROXY`, each byte for byte what `regmirror setup TARGET --connect`
/// writes; a second run changes nothing, and `--undo` puts back the drop-in
/// the machine already had and removes the rest.
#[test]
fn install_ca_connect_writes_each_clients_proxy_environment_and_undoes_it() {
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.3.249:5000";
    let cfg = standalone::write_config(dir.path(), addr, &["registry-1.docker.io"]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[server]\n", "[server]\nconnect = \"127.0.3.249:3128\"\n"),
    )
    .unwrap();
    let _regmirror = standalone::spawn(&cfg, &[], std::process::Stdio::null());
    standalone::wait_listening(addr);

    let machine = tempfile::tempdir().unwrap();
    let root = machine.path().join("root");
    let shims = machine.path().join("shims");
    std::fs::create_dir_all(root.join("etc/systemd/system/docker.service.d")).unwrap();
    std::fs::create_dir_all(&shims).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=debian\n").unwrap();
    // A drop-in of the same name the machine already had: backed up, put back.
    let old_dropin = "[Service]\nEnvironment=\"HTTPS_PROXY=http://corp-proxy:8080\"\n";
    std::fs::write(
        root.join("etc/systemd/system/docker.service.d/regmirror-proxy.conf"),
        old_dropin,
    )
    .unwrap();
    let shim = shims.join("update-ca-certificates");
    std::fs::write(&shim, "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = snapshot(&root);

    // What `regmirror setup … --connect` writes for the same proxy.
    let expected = machine.path().join("setup");
    for target in ["docker", "containerd", "podman"] {
        let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["setup", target, "--connect", "127.0.3.249:3128", "--config"])
            .arg(&cfg)
            .arg("--write")
            .arg(&expected)
            .output()
            .unwrap();
        assert!(out.status.success(), "setup {target} --connect: {out:?}");
    }
    let expected = snapshot(&expected);
    assert_eq!(
        expected.len(),
        4,
        "the CA and three environment files: {:?}",
        expected.keys()
    );

    for _ in 0..2 {
        let said = run(
            &root,
            &shims,
            &[&format!("http://{addr}"), "--connect", "127.0.3.249:3128"],
        );
        assert!(said.contains("HTTPS_PROXY=http://127.0.3.249:3128"), "{said}");
        let now = snapshot(&root);
        for (path, content) in &expected {
            assert_eq!(
                now.get(path).map(|c| String::from_utf8_lossy(c).into_owned()),
                Some(String::from_utf8_lossy(content).into_owned()),
                "{path}: install-ca.sh --connect wrote what regmirror setup --connect writes"
            );
        }
    }
    // `http://HOST` (no port) is the same proxy on 3128.
    run(
        &root,
        &shims,
        &[&format!("http://{addr}"), "--connect", "http://127.0.3.249"],
    );
    assert_eq!(
        snapshot(&root).get("etc/profile.d/regmirror-proxy.sh"),
        expected.get("etc/profile.d/regmirror-proxy.sh")
    );

    run(&root, &shims, &["--undo"]);
    assert_eq!(snapshot(&root), before, "--undo restores every file it changed");

    let bad = Command::new("sh")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install-ca.sh"))
        .args([&format!("http://{addr}"), "--connect", "https://127.0.3.249:3128"])
        .env("REGMIRROR_ROOT", &root)
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an https:// CONNECT proxy was accepted");
    assert_eq!(snapshot(&root), before, "a refused --connect changed nothing");
}
