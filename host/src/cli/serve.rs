//! `genpipe serve`: the HTTP service until SIGTERM or SIGINT, then a graceful drain; SIGHUP (and
//! with `--watch`, a change to the configuration or a plugin file) reloads the configuration.

use std::path::Path;
use std::process::ExitCode;

use tokio::net::TcpListener;

use super::load;
use crate::server::{self, AppState};

pub(super) async fn serve(config: Option<&Path>, listen: Option<String>, watch: bool) -> Result<ExitCode, String> {
    let (config, host) = load(config).await?;
    raise_open_file_limit(config.server.max_connections);
    let address = listen.unwrap_or_else(|| config.server.listen.clone());
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|e| format!("cannot listen on {address}: {e}; pick a free address with --listen or [server] listen"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to find the port.
    println!("genpipe listening on http://{local}");
    for account in config.accounts.iter().filter(|a| a.api_key.is_some()) {
        tracing::info!(account = %account.id, "demo account: Authorization: Bearer {}", account.api_key.as_deref().unwrap_or_default());
    }
    if let Some(admin) = &config.server.admin_key {
        tracing::info!("admin routes: Authorization: Bearer {admin}");
    }
    let config_path = config.source_path();
    let state = AppState::new(host, &config, config_path.as_deref());
    spawn_reload_on_sighup(state.clone());
    if watch {
        server::reload::watch(state.clone())?;
        tracing::info!("watching the configuration and its plugin files: a change reloads them");
    }
    server::serve(listener, state, shutdown_signal()).await.map_err(|e| format!("the server failed: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Files the process needs besides its connections: plugins, the ledger, the compile cache, logs.
const FILES_BESIDES_CONNECTIONS: u64 = 1024;

/// Raises the soft limit of open files towards the hard one, to fit `max_connections` and the
/// process's other files; warns when even the hard limit leaves too little room (connections
/// beyond it wait in the listen queue while accepting fails, so the service stays up).
fn raise_open_file_limit(max_connections: usize) {
    let wanted = max_connections as u64 + FILES_BESIDES_CONNECTIONS;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < wanted && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: wanted.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    if limit.rlim_cur < wanted {
        tracing::warn!(
            "the open file limit is {}, below [server] max_connections ({max_connections}) plus {FILES_BESIDES_CONNECTIONS} \
             for the process's own files; raise it (ulimit -n) or lower max_connections",
            limit.rlim_cur
        );
    }
}

/// Reloads the configuration at every SIGHUP (instead of the default of ending the process).
fn spawn_reload_on_sighup(state: AppState) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    let _ = server::reload::reload(&state, "SIGHUP").await;
                }
            });
        }
        Err(e) => tracing::error!("cannot listen for SIGHUP, so it cannot reload: {e}"),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
