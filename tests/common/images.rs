//! Test images built without network: random-content gzip'd tar layers, a
//! config with `rootfs.diff_ids`, Docker schema2 or OCI manifests, and
//! multi-platform indexes; pushed to a registry over the HTTP API (with a
//! push token from the token server when the registry asks for one).

use std::io::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::sha256_digest;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

impl Format {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_MANIFEST,
            Format::Oci => OCI_MANIFEST,
        }
    }
    pub fn index_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_LIST,
            Format::Oci => OCI_INDEX,
        }
    }
    fn config_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_CONFIG,
            Format::Oci => OCI_CONFIG,
        }
    }
    fn layer_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_LAYER,
            Format::Oci => OCI_LAYER,
        }
    }
}

/// A blob with its digest.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(data: Vec<u8>) -> Blob {
        Blob {
            digest: sha256_digest(&data),
            data,
        }
    }
}

/// A single-platform image.
#[derive(Clone, Debug)]
pub struct Image {
    pub format: Format,
    pub os: String,
    pub arch: String,
    pub config: Blob,
    /// gzip'd tar layers, in order.
    pub layers: Vec<Blob>,
    /// sha256 of each uncompressed tar.
    pub diff_ids: Vec<String>,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

impl Image {
    pub fn media_type(&self) -> &'static str {
        self.format.manifest_type()
    }
    /// Digests of the config and every layer.
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(self.config.digest.clone())
            .chain(self.layers.iter().map(|l| l.digest.clone()))
            .collect()
    }
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}

/// A multi-platform index (manifest list) and its images.
#[derive(Clone, Debug)]
pub struct MultiImage {
    pub format: Format,
    pub index: Vec<u8>,
    pub index_digest: String,
    pub images: Vec<Image>,
}

impl MultiImage {
    pub fn media_type(&self) -> &'static str {
        self.format.index_type()
    }
    pub fn platform(&self, arch: &str) -> &Image {
        self.images
            .iter()
            .find(|i| i.arch == arch)
            .unwrap_or_else(|| panic!("no {arch} image in index"))
    }
}

/// Random bytes from the system RNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut out = vec![0u8; n];
    for chunk in out.chunks_mut(1 << 16) {
        rng.fill(chunk).expect("rng");
    }
    out
}

/// A gzip'd tar of ~`size` random bytes over a few files. Returns
/// (compressed blob, diff_id).
pub fn random_layer(size: usize) -> (Blob, String) {
    let files = 3usize;
    let mut builder = tar::Builder::new(Vec::new());
    let tag = hex::encode(random_bytes(4));
    for i in 0..files {
        let len = size / files + usize::from(i == 0) * (size % files);
        let data = random_bytes(len);
        let mut header = tar::Header::new_gnu();
        header.set_size(len as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, format!("data/{tag}/file{i}.bin"), data.as_slice())
            .expect("tar append");
    }
    let tar = builder.into_inner().expect("tar finish");
    let diff_id = sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    (Blob::new(gz.finish().expect("gzip finish")), diff_id)
}

/// An image for `os`/`arch` with one random layer per entry of `layer_sizes`.
pub fn build_image(format: Format, arch: &str, layer_sizes: &[usize]) -> Image {
    let os = "linux";
    let (layers, diff_ids): (Vec<Blob>, Vec<String>) = layer_sizes.iter().map(|s| random_layer(*s)).unzip();
    let config = serde_json::json!({
        "architecture": arch,
        "os": os,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "Labels": {"test.nonce": hex::encode(random_bytes(8))}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layers.iter().map(|_| serde_json::json!({"created": "2024-01-01T00:00:00Z", "created_by": "regmirror test"})).collect::<Vec<_>>(),
    });
    let config = Blob::new(serde_json::to_vec(&config).expect("config json"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": format.manifest_type(),
        "config": {"mediaType": format.config_type(), "size": config.data.len(), "digest": config.digest},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": format.layer_type(), "size": l.data.len(), "digest": l.digest
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec_pretty(&manifest).expect("manifest json");
    Image {
        format,
        os: os.into(),
        arch: arch.into(),
        manifest_digest: sha256_digest(&manifest),
        manifest,
        config,
        layers,
        diff_ids,
    }
}

/// An index over one image per arch in `arches`, each with its own layers.
pub fn build_index(format: Format, arches: &[&str], layer_sizes: &[usize]) -> MultiImage {
    let images: Vec<Image> = arches.iter().map(|a| build_image(format, a, layer_sizes)).collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": format.index_type(),
        "manifests": images.iter().map(|i| serde_json::json!({
            "mediaType": i.media_type(), "size": i.manifest.len(), "digest": i.manifest_digest,
            "platform": {"architecture": i.arch, "os": i.os},
        })).collect::<Vec<_>>(),
    });
    let index = serde_json::to_vec_pretty(&index).expect("index json");
    MultiImage {
        format,
        index_digest: sha256_digest(&index),
        index,
        images,
    }
}

/// Pushes to one registry over the distribution HTTP API.
pub struct Pusher {
    /// `https://host[:port]` as reachable from the test process.
    pub base: String,
    pub client: reqwest::Client,
    /// Basic credentials used at the token realm when challenged.
    pub creds: Option<(String, String)>,
}

impl Pusher {
    pub fn new(base: &str, ca_pem: &str, creds: Option<(String, String)>) -> Pusher {
        Pusher {
            base: base.trim_end_matches('/').to_string(),
            client: super::http_client(ca_pem.as_bytes()),
            creds,
        }
    }

    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) {
        super::block_on(async {
            let token = self.token(repo).await;
            self.push_image_parts(repo, image, token.as_deref()).await;
            self.put_manifest(repo, tag, image.media_type(), &image.manifest, token.as_deref())
                .await;
        });
    }

    pub fn push_index(&self, repo: &str, tag: &str, multi: &MultiImage) {
        super::block_on(async {
            let token = self.token(repo).await;
            for image in &multi.images {
                self.push_image_parts(repo, image, token.as_deref()).await;
                self.put_manifest(
                    repo,
                    &image.manifest_digest,
                    image.media_type(),
                    &image.manifest,
                    token.as_deref(),
                )
                .await;
            }
            self.put_manifest(repo, tag, multi.media_type(), &multi.index, token.as_deref())
                .await;
        });
    }

    async fn push_image_parts(&self, repo: &str, image: &Image, token: Option<&str>) {
        self.push_blob(repo, &image.config, token).await;
        for layer in &image.layers {
            self.push_blob(repo, layer, token).await;
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
        match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A push token for `repo` if the registry challenges with Bearer, else None.
    async fn token(&self, repo: &str) -> Option<String> {
        let resp = self
            .client
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .expect("GET /v2/");
        if resp.status() != 401 {
            return None;
        }
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .expect("401 without WWW-Authenticate")
            .to_string();
        let params = parse_challenge(&challenge);
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .expect("realm");
        let mut url = url::Url::parse(&realm).expect("realm URL");
        {
            let mut q = url.query_pairs_mut();
            if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &format!("repository:{repo}:pull,push"));
        }
        let mut req = self.client.get(url);
        if let Some((u, p)) = &self.creds {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.expect("token request");
        assert!(resp.status().is_success(), "token request failed: {}", resp.status());
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("token body")).expect("token json");
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
    }

    async fn push_blob(&self, repo: &str, blob: &Blob, token: Option<&str>) {
        let head = self
            .auth(
                self.client
                    .head(format!("{}/v2/{repo}/blobs/{}", self.base, blob.digest)),
                token,
            )
            .send()
            .await
            .expect("HEAD blob");
        if head.status() == 200 {
            return;
        }
        let resp = self
            .auth(
                self.client.post(format!("{}/v2/{repo}/blobs/uploads/", self.base)),
                token,
            )
            .send()
            .await
            .expect("POST upload");
        assert_eq!(resp.status(), 202, "start upload of {} to {repo}", blob.digest);
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("upload Location")
            .to_string();
        let mut url = url::Url::parse(&format!("{}/", self.base))
            .and_then(|base| base.join(&location))
            .expect("upload URL");
        url.query_pairs_mut().append_pair("digest", &blob.digest);
        let resp = self
            .auth(self.client.put(url), token)
            .header("content-type", "application/octet-stream")
            .body(blob.data.clone())
            .send()
            .await
            .expect("PUT blob");
        let status = resp.status();
        assert_eq!(
            status,
            201,
            "upload {}: {}",
            blob.digest,
            resp.text().await.unwrap_or_default()
        );
    }

    async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8], token: Option<&str>) {
        let resp = self
            .auth(
                self.client
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base)),
                token,
            )
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        let status = resp.status();
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(
            status,
            201,
            "PUT manifest {repo}:{reference}: {}",
            resp.text().await.unwrap_or_default()
        );
        assert_eq!(
            digest.as_deref(),
            Some(sha256_digest(body).as_str()),
            "registry digest of {repo}:{reference}"
        );
    }
}

/// Parses `Bearer realm="…",service="…",scope="…"` into pairs.
pub fn parse_challenge(value: &str) -> Vec<(String, String)> {
    let rest = value.split_once(' ').map(|(_, r)| r).unwrap_or("");
    let mut out = Vec::new();
    let mut s = rest;
    while let Some((key, after)) = s.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"').unwrap_or(q.len());
            (q[..end].to_string(), q.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        out.push((key, val));
        s = next;
    }
    out
}

/// `Basic` header value for `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// `image` as an OCI image layout (what `skopeo copy oci:DIR:1` reads).
pub fn write_layout(dir: &std::path::Path, image: &Image) -> std::path::PathBuf {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    let put = |digest: &str, data: &[u8]| {
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), data).expect("layout blob");
    };
    put(&image.config.digest, &image.config.data);
    for l in &image.layers {
        put(&l.digest, &l.data);
    }
    put(&image.manifest_digest, &image.manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": image.media_type(),
            "digest": image.manifest_digest,
            "size": image.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "1"},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    dir.to_path_buf()
}
