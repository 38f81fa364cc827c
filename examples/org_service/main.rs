//! A small multi-tenant web service on cachet and axum: org contexts resolved by the org
//! middleware, cached in memory or in Redis behind a per-instance L1, invalidated on every
//! instance when an org changes; API keys (`<slug>.<api_secret>`) validated against the store
//! and cached under an HMAC of the key; cachet's metrics served at `/metrics` for Prometheus.
//!
//! ```text
//! cargo run --example org_service --features axum,metrics          # in-memory cache
//! export CACHE_ENCRYPTION_KEY="$(openssl rand -base64 32)"
//! export TOKEN_DIGEST_KEY="$(openssl rand -base64 32)"
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example org_service --features axum,metrics
//! ```
//!
//! Settings (environment):
//! - `REDIS_URL`: Redis through a `TieredCacheService` (an L1 per instance, invalidated over
//!   pub/sub); unset: the in-memory `MokaCacheService`.
//! - `CACHE_ENCRYPTION_KEY` (required with `REDIS_URL`; the same on every instance): 64 hex
//!   digits or the base64 of 32 bytes (`openssl rand -base64 32`). Org contexts hold
//!   secrets, so what goes to Redis is encrypted (AES-256-GCM-SIV at the tiered cache's L2
//!   boundary, `TieredCacheServiceBuilder::encrypt_l2`; the in-process L1 holds plain values).
//! - `TOKEN_DIGEST_KEY` (required with `REDIS_URL`; the same on every instance): 64 hex digits
//!   or the base64 of at least 16 bytes (`openssl rand -base64 32`). Validated API keys are
//!   cached under `token:<hex HMAC-SHA256(this key, API key)>`, so a copy of Redis's keys does
//!   not let anyone test guessed API keys offline. Unset without Redis: a random key drawn at
//!   startup (only this process reads its in-memory cache).
//! - `ORG_STORE_DIR`: the org store, one `<slug>.json` per org (default `./org-store`,
//!   created if missing).
//! - `STORE_DELAY_MS`: an artificial delay on every store load (default 0).
//! - `BIND`: the listening address (default `127.0.0.1:3000`).
//!
//! Endpoints:
//! - `PUT /orgs/{slug}` with `{"id": "1", "name": "Acme", "plan": "pro", "api_secret": "..."}`
//!   writes the org's file, then invalidates its cache keys on every instance.
//! - `GET /orgs/{slug}`: the org (without its secret), through the org middleware: 404 for an
//!   unknown org, 503 when the store fails with nothing cached, `x-org-stale: true` when the
//!   last known org is served because the store fails.
//!   When the org's `api_secret` (or id) changes, its previous API key stops working at once,
//!   on every instance.
//! - `GET /me` with `authorization: Bearer <slug>.<api_secret>`: the key's org as
//!   `{"id": ..., "slug": ...}`; 401 (one body for every case) for a missing or malformed
//!   header, an unknown org or a wrong secret; 503 when the store fails. The key is checked
//!   against the store (in constant time) on a cache miss only, and cached for at most 60 s.
//! - `GET /stats`: store loads by this instance, (tiered) invalidations applied, and API keys
//!   validated against the store.
//! - `GET /metrics`: cachet's metrics in Prometheus's text format (`text/plain;
//!   version=0.0.4`), for a Prometheus scrape job: hits and misses by layer
//!   (`cachet_hits_total{layer="l1"}`, ...), loads by outcome, invalidations, errors, and
//!   durations as histograms (buckets from 50 µs to 2.5 s, `app::DURATION_BUCKETS`). The
//!   recorder is installed before any cache is built (cachet registers its metric handles
//!   then); there is no separate metrics port.
//!
//! ```text
//! curl -X PUT localhost:3000/orgs/acme -H 'content-type: application/json' \
//!      -d '{"id":"1","name":"Acme","plan":"pro","api_secret":"s3cr3t"}'
//! curl localhost:3000/orgs/acme
//! curl localhost:3000/me -H 'authorization: Bearer acme.s3cr3t'   # {"id":"1","slug":"acme"}
//! curl localhost:3000/stats
//! curl localhost:3000/metrics                # e.g. cachet_hits_total{layer="l1"} 1
//! ```

mod app;

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

/// How often the recorder drains histogram samples into their buckets between scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("org_service: {e}");
            ExitCode::FAILURE
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

fn settings_from_env() -> Result<app::Settings, String> {
    let store_delay = match var("STORE_DELAY_MS") {
        None => Duration::ZERO,
        Some(text) => Duration::from_millis(text.trim().parse().map_err(|e| {
            format!("STORE_DELAY_MS must be a number of milliseconds, got {text:?}: {e}")
        })?),
    };
    Ok(app::Settings {
        redis_url: var("REDIS_URL"),
        store_dir: PathBuf::from(var("ORG_STORE_DIR").unwrap_or_else(|| "org-store".to_owned())),
        store_delay,
        channel_prefix: None,
        encryption_key: var("CACHE_ENCRYPTION_KEY")
            .map(|text| cachet::EncryptionKey::parse(&text))
            .transpose()
            .map_err(|e| format!("CACHE_ENCRYPTION_KEY: {e}"))?,
        token_digest_key: var("TOKEN_DIGEST_KEY")
            .map(|text| app::parse_token_digest_key(&text))
            .transpose()
            .map_err(|e| format!("TOKEN_DIGEST_KEY {e}"))?,
    })
}

async fn run() -> Result<(), Box<dyn Error>> {
    let settings = settings_from_env()?;
    let bind = var("BIND").unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    // Before build_state: cachet's services register their metric handles when they are
    // built, and a cache built before the recorder would report to nothing for good.
    let metrics = app::prometheus_builder()
        .install_recorder()
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    spawn_metrics_upkeep(metrics.clone());
    let state = app::build_state(&settings).await?.with_metrics(metrics);
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let address = listener.local_addr()?;
    println!("org_service listening on http://{address} (metrics: http://{address}/metrics)");
    println!(
        "cache: {}; org store: {} (delay {:?})",
        if state.tiered.is_some() {
            "Redis with an in-memory L1 (REDIS_URL)"
        } else {
            "in memory"
        },
        settings.store_dir.display(),
        settings.store_delay,
    );
    println!(
        "API keys cached under an HMAC-SHA256 digest (key: {})",
        if settings.token_digest_key.is_some() {
            "TOKEN_DIGEST_KEY"
        } else {
            "random, this process only"
        }
    );
    axum::serve(listener, app::app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| format!("server on {address} failed: {e}"))?;
    Ok(())
}

/// Runs the recorder's upkeep now and then: without an HTTP listener of its own, nothing else
/// does between scrapes, and the histograms' samples would pile up until the next one.
fn spawn_metrics_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(METRICS_UPKEEP);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}
