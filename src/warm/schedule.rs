//! `[[warm]]`: images pulled into the cache every `every`, without a
//! client, so the first pull of the day (or after an eviction) is a hit.
//!
//! Each schedule runs once at start and then `every` after its last run
//! ended, its images one after another. Requests go straight to the
//! server's own handler, as from a client of the plain listener with no
//! login: the same fetch path, download limits and access rules as a pull,
//! and the request log shows them with `listener=warm`. A failed image is
//! logged and counted; the run goes on with the next image, and the whole
//! schedule tries again at its next run. Serving never waits for a run.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::BodyExt;

use super::{warm_image, Answer, Get, Puller, Quiet, Warmed};
use crate::metrics::{WarmRunLabel, METRICS};
use crate::registry::body::Body;
use crate::registry::{handle, App, ConnInfo, Listener};

/// Starts one task per schedule; each ends when the server's `App` is gone.
pub fn spawn(app: &Arc<App>) {
    for i in 0..app.settings.warm.len() {
        let weak = Arc::downgrade(app);
        tokio::spawn(async move {
            loop {
                let Some(app) = weak.upgrade() else { return };
                run(&app, i).await;
                let every = app.settings.warm[i].every;
                drop(app);
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// One run of schedule `i`: every image, whatever became of the others.
async fn run(app: &Arc<App>, i: usize) {
    let schedule = &app.settings.warm[i];
    app.warming.started(i, SystemTime::now());
    let puller = InProcess { app: app.clone() };
    let mut total = Warmed::default();
    let mut errors = Vec::new();
    for image in &schedule.images {
        match warm_image(&puller, &app.settings.upstreams, image, &schedule.platforms, &Quiet).await {
            Ok(w) => {
                tracing::info!(%image, images = w.images, blobs = w.blobs, bytes = w.bytes, "scheduled warm: image warmed");
                total.images += w.images;
                total.blobs += w.blobs;
                total.bytes += w.bytes;
            }
            Err(e) => {
                tracing::warn!(%image, error = %e, every = ?schedule.every, "scheduled warm failed; tried again at the next run");
                errors.push(format!("{image}: {e}"));
            }
        }
    }
    let result = if errors.is_empty() {
        Ok(total)
    } else {
        Err(errors.join("; "))
    };
    let label = WarmRunLabel {
        result: if result.is_ok() { "ok" } else { "failed" },
    };
    METRICS.warm_runs.get_or_create(&label).inc();
    app.warming.finished(i, result, SystemTime::now());
}

/// Requests handled by the server itself, as from an anonymous client of
/// the plain listener.
struct InProcess {
    app: Arc<App>,
}

#[async_trait]
impl Puller for InProcess {
    async fn get(&self, get: Get<'_>) -> Result<Box<dyn Answer>, String> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(get.path)
            .header(header::HOST, &self.app.settings.server_name);
        if let Some(a) = get.accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(t) = get.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if get.fresh {
            req = req.header(header::CACHE_CONTROL, "no-cache");
        }
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| format!("{}: {e}", get.path))?;
        let conn = ConnInfo {
            listener: Listener::Warm,
            ..Default::default()
        };
        let resp = handle(self.app.clone(), conn, req).await;
        let warning = resp
            .headers()
            .get(header::WARNING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Box::new(InProcessAnswer {
            status: resp.status().as_u16(),
            warning,
            body: resp.into_body(),
        }))
    }
}

struct InProcessAnswer {
    status: u16,
    warning: Option<String>,
    body: Body,
}

#[async_trait]
impl Answer for InProcessAnswer {
    fn status(&self) -> u16 {
        self.status
    }

    fn warning(&self) -> Option<String> {
        self.warning.clone()
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}
