//! The container image (`Dockerfile`) and the Kubernetes example
//! (`deploy/kubernetes/`), checked the way they fail in use: a manifest the
//! API server would reject, a config the replicas would refuse, a mount or
//! port that does not meet the config it serves, node files that point
//! nowhere, an image that does not build or whose binary cannot run.
//!
//! Needs `kubernetes-validate` (PyPI; it brings PyYAML, which reads the
//! manifests here) and buildah, both installed by scripts/test.sh, and the
//! static binary scripts/test.sh builds before `cargo test`.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_regmirror");

/// The oldest Kubernetes release the example claims to work on, and the
/// newest schema kubernetes-validate (pinned in scripts/test.sh) bundles: a
/// field added after the first or removed before the second fails here.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

fn manifest_paths() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(Path::new(REPO).join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no deploy/kubernetes/*.yaml");
    paths
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The YAML documents of `path`, read by PyYAML (YAML 1.1, as kubectl
/// reads them: `0400` is octal), empty documents dropped.
fn documents(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             print(json.dumps(docs))",
        ])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "reading {} with PyYAML failed (scripts/test.sh installs it with kubernetes-validate): {}",
        path.display(),
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn all_documents() -> Vec<Value> {
    manifest_paths().iter().flat_map(|p| documents(p)).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/kubernetes/ has no {kind} {name}"))
}

/// Validates `paths` against every pinned schema with no network (the
/// schemas must come with the package, or CI would depend on a download).
/// kubernetes-validate only warns, exit 0, about a kind it has no schema
/// for, so each document must also be reported as passed.
fn validate(paths: &[PathBuf]) -> Result<(), String> {
    let docs: usize = paths.iter().map(|p| documents(p).len()).sum();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new("unshare")
            .args([
                "--net",
                "python3",
                "-m",
                "kubernetes_validate",
                "--strict",
                "-k",
                version,
            ])
            .args(paths)
            .output()
            .expect("run unshare python3 -m kubernetes_validate");
        let said = output_text(&out);
        let passed = said.lines().filter(|l| l.contains(" passed for resource ")).count();
        if !out.status.success() || passed != docs || said.contains("WARN") {
            return Err(format!(
                "Kubernetes {version}: {passed} of {docs} documents passed ({}):\n{said}",
                out.status
            ));
        }
    }
    Ok(())
}

#[test]
fn every_manifest_validates_offline_against_pinned_kubernetes_schemas() {
    let paths = manifest_paths();
    if let Err(e) = validate(&paths) {
        panic!("{e}");
    }

    // The validation must be able to fail: a misspelt field and a misspelt
    // kind in a copy of a manifest are each refused.
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(Path::new(REPO).join("deploy/kubernetes/statefulset.yaml")).unwrap();
    for (good, bad) in [
        ("readinessProbe:", "readinesProbe:"),
        ("kind: StatefulSet", "kind: StatefulSett"),
    ] {
        assert!(original.contains(good), "statefulset.yaml has no {good:?}");
        let copy = dir.path().join("statefulset.yaml");
        std::fs::write(&copy, original.replace(good, bad)).unwrap();
        let Err(err) = validate(&[copy]) else {
            panic!("{bad:?} passed validation");
        };
        assert!(
            err.contains(bad.trim_end_matches(':').trim_start_matches("kind: ")),
            "{err}"
        );
    }
}

/// The config.toml the replicas run, as the ConfigMap holds it.
fn configmap_config(docs: &[Value]) -> String {
    find(docs, "ConfigMap", "regmirror-config")["data"]["config.toml"]
        .as_str()
        .expect("the ConfigMap holds config.toml")
        .to_string()
}

fn regmirror(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = Command::new(BIN).args(args).current_dir(cwd).output().unwrap();
    (out.status.success(), output_text(&out))
}

/// Lays out `files` the way the kubelet projects a Secret volume: each name
/// a symlink into `..data`, itself a symlink to a timestamped directory,
/// with the volume's `defaultMode` on the files.
fn secret_volume(dir: &Path, files: &[(&str, &Path)], mode: u32) {
    let data = dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&data).unwrap();
    for (name, src) in files {
        let target = data.join(name);
        std::fs::copy(src, &target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
        symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
    }
    symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
}

fn statefulset_pod(docs: &[Value]) -> &Value {
    &find(docs, "StatefulSet", "regmirror")["spec"]["template"]["spec"]
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The CA Secret as the documented command makes it (`regmirror ca export`
/// with the default config, in an empty directory), mounted the way the
/// StatefulSet mounts it: the ConfigMap's config accepts it, so its name
/// constraints cover every intercepted name and `defaultMode` satisfies the
/// key-permission check through the kubelet's symlinks.
#[test]
fn configmap_config_passes_check_with_the_ca_secret_as_documented() {
    let docs = all_documents();
    let config = configmap_config(&docs);
    let parsed: toml::Table = config.parse().unwrap();
    let ca_dir = parsed["ca"]["dir"].as_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (ok, said) = regmirror(&["ca", "export"], dir.path());
    assert!(ok, "regmirror ca export: {said}");
    let certs = dir.path().join("certs");
    let mode = volume(statefulset_pod(&docs), "ca")["secret"]["defaultMode"]
        .as_u64()
        .expect("the CA volume sets defaultMode") as u32;
    let mounted = dir.path().join("mounted-ca");
    secret_volume(
        &mounted,
        &[("ca.pem", &certs.join("ca.pem")), ("ca.key", &certs.join("ca.key"))],
        mode,
    );

    // The cluster secret, as `kubectl create secret … --from-literal` makes it.
    let secret_file = parsed["cluster"]["secret_file"].as_str().unwrap();
    let secret_src = dir.path().join("cluster-secret");
    std::fs::write(&secret_src, "0123456789abcdef0123456789abcdef").unwrap();
    let secret_mode = volume(statefulset_pod(&docs), "cluster")["secret"]["defaultMode"]
        .as_u64()
        .unwrap() as u32;
    let mounted_secret = dir.path().join("mounted-cluster");
    let secret_name = Path::new(secret_file).file_name().unwrap().to_str().unwrap();
    secret_volume(&mounted_secret, &[(secret_name, &secret_src)], secret_mode);

    let quoted = format!("\"{ca_dir}\"");
    assert!(config.contains(&quoted), "{config}");
    let path = dir.path().join("config.toml");
    let config = config.replace(&quoted, &format!("\"{}\"", mounted.display())).replace(
        &format!("\"{secret_file}\""),
        &format!("\"{}\"", mounted_secret.join(secret_name).display()),
    );
    std::fs::write(&path, config).unwrap();
    // POD_IP as the downward API sets it (cluster.self uses it).
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .current_dir(dir.path())
        .env("POD_IP", "10.244.1.7")
        .output()
        .unwrap();
    let (ok, said) = (out.status.success(), output_text(&out));
    assert!(ok, "regmirror check on the ConfigMap's config.toml: {said}");
    assert!(said.contains("config OK"), "{said}");
    assert!(said.contains(&format!("CA in {}", mounted.display())), "{said}");
}

/// What schema validation cannot see: the StatefulSet's mounts, ports,
/// probes and environment agree with the config in the ConfigMap, and the
/// Services reach the pods.
#[test]
fn manifests_agree_with_the_config_they_mount() {
    let docs = all_documents();
    let config: toml::Table = configmap_config(&docs).parse().unwrap();
    let pod = statefulset_pod(&docs);
    let container = &pod["containers"][0];

    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
        .collect();
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|(n, _)| *n == volume)
            .unwrap_or_else(|| panic!("no mount of volume {volume}: {mounts:?}"))
            .1
    };
    assert_eq!(volume(pod, "config")["configMap"]["name"], "regmirror-config");
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["serve", "--config", &format!("{}/config.toml", mount_of("config"))]
    );
    assert_eq!(volume(pod, "ca")["secret"]["secretName"], "regmirror-ca");
    assert_eq!(mount_of("ca"), config["ca"]["dir"].as_str().unwrap());
    assert!(volume(pod, "read-cache")["emptyDir"].is_object());
    assert_eq!(mount_of("read-cache"), config["cache"]["dir"].as_str().unwrap());
    assert_eq!(volume(pod, "cluster")["secret"]["secretName"], "regmirror-cluster");
    let secret_file = config["cluster"]["secret_file"].as_str().unwrap();
    assert_eq!(
        Path::new(secret_file).parent().unwrap().to_str().unwrap(),
        mount_of("cluster"),
        "cluster.secret_file is in the cluster Secret's mount"
    );
    // cluster.self names the pod IP the downward API puts in POD_IP, on
    // the plain listener's port; peers_dns is the headless Service.
    let self_url = config["cluster"]["self"].as_str().unwrap();
    assert!(self_url.contains("${POD_IP}"), "{self_url}");
    let pod_ip = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_IP")
        .expect("env POD_IP");
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert!(
        config["cluster"]["peers_dns"]
            .as_str()
            .unwrap()
            .starts_with("regmirror-peers."),
        "peers_dns names the headless Service"
    );
    let mode = volume(pod, "ca")["secret"]["defaultMode"].as_u64().unwrap();
    assert_eq!(mode & 0o077, 0, "regmirror refuses a ca.key others can read: {mode:o}");

    // The emptyDir holds the whole read cache with room for downloads in flight.
    let size_limit = bytes(volume(pod, "read-cache")["emptyDir"]["sizeLimit"].as_str().unwrap());
    let max_size = bytes(config["cache"]["max_size"].as_str().unwrap());
    assert!(
        size_limit > max_size,
        "emptyDir sizeLimit {size_limit} <= cache.max_size {max_size}"
    );

    // Ports: named as the config's listeners; the probe asks the plain one.
    let port_of = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let listener_port = |key: &str| {
        let addr: std::net::SocketAddr = config["server"][key].as_str().unwrap().parse().unwrap();
        u64::from(addr.port())
    };
    assert_eq!(port_of("https"), listener_port("https"));
    assert_eq!(port_of("http"), listener_port("http"));
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(readiness["path"], "/readyz");
    assert_eq!(readiness["port"], "http");
    assert_eq!(readiness["scheme"], "HTTP");

    let env: Vec<(&str, &Value)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"].is_object())
        .map(|e| (e["name"].as_str().unwrap(), &e["valueFrom"]["secretKeyRef"]))
        .collect();
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        let (_, from) = env
            .iter()
            .find(|(n, _)| *n == var)
            .unwrap_or_else(|| panic!("no env {var}"));
        assert_eq!(from["name"], "regmirror-s3", "{var}");
        assert_eq!(from["key"], var);
    }

    let sts = find(&docs, "StatefulSet", "regmirror");
    assert_eq!(sts["spec"]["replicas"], 3);
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    let peers = find(&docs, "Service", "regmirror-peers");
    assert_eq!(
        peers["spec"]["clusterIP"], "None",
        "peer discovery needs a headless Service"
    );
    assert_eq!(sts["spec"]["serviceName"], "regmirror-peers");
    assert_eq!(
        find(&docs, "Service", "regmirror")["spec"]["sessionAffinity"],
        "ClientIP",
        "a client's requests stay on one replica (its local read cache, its upload sessions)"
    );
    for name in ["regmirror-peers", "regmirror", "regmirror-node"] {
        let svc = find(&docs, "Service", name);
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                &labels[k], v,
                "Service {name} selects {k}={v}, which the pods do not carry"
            );
        }
        for p in svc["spec"]["ports"].as_array().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert_eq!(
                p["port"].as_u64().unwrap(),
                port_of(target),
                "Service {name} port {target}"
            );
        }
    }
}

/// `10Gi`, `10GiB`, `512Mi`: what the manifests and config.toml write.
fn bytes(size: &str) -> u64 {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = match size[digits.len()..].trim_end_matches('B') {
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => panic!("unit {other:?} in {size:?}"),
    };
    digits.parse::<u64>().unwrap() * unit
}

/// The DaemonSet's init container, run as the kubelet would run it (its
/// args, `$(NODE_IP)` expanded, the host's certs.d at its mount): every
/// mirrored registry gets a hosts.toml on the node's path that sends pulls
/// to the NodePort on the node's own address.
#[test]
fn node_setup_writes_a_hosts_toml_per_registry_pointing_at_the_node_port() {
    let docs = all_documents();
    let node_port = find(&docs, "Service", "regmirror-node")["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    let pod = &find(&docs, "DaemonSet", "regmirror-node-setup")["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    let mount = &init["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "containerd-certs")
        .expect("the init container mounts the node's certs.d")["mountPath"];
    assert_eq!(
        volume(pod, "containerd-certs")["hostPath"]["path"],
        "/etc/containerd/certs.d"
    );
    let node_ip = init["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_IP")
        .expect("NODE_IP in the init container's env");
    assert_eq!(node_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");

    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.toml");
    // The cluster Secret, mounted where the config says.
    let parsed: toml::Table = configmap_config(&docs).parse().unwrap();
    let secret_file = parsed["cluster"]["secret_file"].as_str().unwrap();
    let secret_mount = init["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "cluster")
        .expect("the init container mounts the cluster Secret (setup reads the config whole)")["mountPath"]
        .as_str()
        .unwrap();
    assert_eq!(Path::new(secret_file).parent().unwrap().to_str().unwrap(), secret_mount);
    let secret = dir.path().join("cluster-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let config = configmap_config(&docs).replace(&format!("\"{secret_file}\""), &format!("\"{}\"", secret.display()));
    std::fs::write(&config_path, config).unwrap();
    assert!(
        init["env"].as_array().unwrap().iter().any(|e| e["name"] == "POD_IP"),
        "POD_IP in the init container's env (cluster.self names it)"
    );
    let host = dir.path().join("host");
    // The host root is what `mountPath` minus the node's path leaves.
    let host_root = mount
        .as_str()
        .unwrap()
        .strip_suffix("/etc/containerd/certs.d")
        .expect("certs.d mounted under a host root");
    let args: Vec<String> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap().replace("$(NODE_IP)", "10.1.2.3");
            if a == "/etc/regmirror/config.toml" {
                config_path.display().to_string()
            } else if a == host_root {
                host.display().to_string()
            } else {
                a
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = Command::new(BIN)
        .args(&args)
        .current_dir(dir.path())
        .env("POD_IP", "10.244.2.9")
        .output()
        .unwrap();
    let (ok, said) = (out.status.success(), output_text(&out));
    assert!(ok, "regmirror {args:?}: {said}");

    let config: toml::Table = configmap_config(&docs).parse().unwrap();
    let upstreams = config["upstream"].as_array().unwrap();
    assert!(!upstreams.is_empty());
    for u in upstreams {
        let name = u["name"].as_str().unwrap();
        let path = host.join("etc/containerd/certs.d").join(name).join("hosts.toml");
        let toml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            toml.contains(&format!("[host.\"http://10.1.2.3:{node_port}\"]")),
            "{}:\n{toml}",
            path.display()
        );
        assert!(toml.contains("\"pull\", \"resolve\""), "{toml}");
    }
}

/// The static binary the image is built from; scripts/test.sh builds it.
fn static_binary() -> PathBuf {
    let path = std::env::var_os("REGMIRROR_STATIC_BIN").map_or_else(
        || Path::new(REPO).join("target/x86_64-unknown-linux-gnu/release/regmirror"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no static regmirror binary at {} (set REGMIRROR_STATIC_BIN, or build it as scripts/test.sh does: \
         RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --locked --target x86_64-unknown-linux-gnu)",
        path.display()
    );
    let elf = std::fs::read(&path).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{} is dynamically linked: it cannot run in a FROM scratch image (build it with -C target-feature=+crt-static)",
        path.display()
    );
    path
}

/// Whether a 64-bit little-endian ELF file names a program interpreter
/// (PT_INTERP): a dynamically linked binary, which a scratch image cannot run.
fn has_interpreter(elf: &[u8]) -> bool {
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// buildah on a private store in a temp dir: nothing it makes outlives the
/// test, whatever the test's outcome.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new() -> Buildah {
        Buildah {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .expect("run buildah");
        let said = output_text(&out);
        assert!(out.status.success(), "buildah {args:?}: {said}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        for args in [&["rm", "--all"][..], &["rmi", "--all", "--force"][..]] {
            let _ = Command::new("buildah")
                .arg("--root")
                .arg(self.dir.path().join("root"))
                .arg("--runroot")
                .arg(self.dir.path().join("runroot"))
                .args(["--storage-driver", "vfs"])
                .args(args)
                .output();
        }
    }
}

/// The image as the Dockerfile's comment builds it, from a context of the
/// three files it copies: its binary runs there (static, no libc in the
/// image), checks the example config, and keeps the CA under the working
/// directory, where the one documented volume is.
#[test]
fn image_builds_from_the_dockerfile_and_checks_its_config() {
    let bin = static_binary();
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    std::fs::create_dir(&context).unwrap();
    for (from, name) in [
        (bin.as_path(), "regmirror"),
        (Path::new("/etc/ssl/certs/ca-certificates.crt"), "ca-certificates.crt"),
        (&Path::new(REPO).join("config.toml"), "config.toml"),
    ] {
        std::fs::copy(from, context.join(name)).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    }

    let buildah = Buildah::new();
    let dockerfile = Path::new(REPO).join("Dockerfile");
    buildah.run(&[
        "bud",
        "--isolation",
        "chroot",
        "-t",
        "regmirror-deploy-test",
        "-f",
        dockerfile.to_str().unwrap(),
        context.to_str().unwrap(),
    ]);
    let inspect: Value =
        serde_json::from_str(&buildah.run(&["inspect", "--type", "image", "regmirror-deploy-test"])).unwrap();
    let image = &inspect["OCIv1"]["config"];
    assert_eq!(image["Entrypoint"], serde_json::json!(["/usr/bin/regmirror"]));
    assert_eq!(
        image["Cmd"],
        serde_json::json!(["serve", "--config", "/etc/regmirror/config.toml"])
    );
    assert_eq!(image["WorkingDir"], "/var/lib/regmirror");

    let ctr = buildah.run(&["from", "regmirror-deploy-test"]).trim().to_string();
    let in_image = |args: &[&str]| {
        let mut all = vec!["run", "--isolation", "chroot", ctr.as_str(), "--", "/usr/bin/regmirror"];
        all.extend_from_slice(args);
        buildah.run(&all)
    };
    let said = in_image(&["check", "--config", "/etc/regmirror/config.toml"]);
    assert!(said.contains("config OK"), "{said}");

    let pem = in_image(&["ca", "export", "--config", "/etc/regmirror/config.toml"]);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let root = PathBuf::from(buildah.run(&["mount", &ctr]).trim());
    let key = root.join("var/lib/regmirror/certs/ca.key");
    let mode = std::fs::metadata(&key)
        .unwrap_or_else(|e| panic!("{}: {e}", key.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(root.join("var/lib/regmirror/certs/ca.pem")).unwrap(),
        pem
    );
    buildah.run(&["umount", &ctr]);
}
