//! Host API: functions a UDF may call during its execution (proto/host_api.proto
//! has the wire format). Handlers run on a small thread pool, never on an engine
//! thread, so a slow or blocking handler delays only its own call. An unknown
//! function, a handler error or a handler panic becomes an error reply to the UDF;
//! the execution goes on.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use futures_executor::ThreadPool;

use crate::{CodeToken, Error, ExecutionToken, Result};

/// The marker a UDF sends before a host call: a frame length no response can have.
pub const CALL_MARKER: u64 = 1 << 63;

/// What a host function learns about the call.
#[derive(Clone, Debug)]
pub struct HostCallContext {
    pub code_token: CodeToken,
    pub execution: ExecutionToken,
    /// `ExecuteOptions::metadata` of the execution.
    pub metadata: Arc<HashMap<String, String>>,
}

/// Result of a host function: the serialized response, or an error text for the UDF.
pub type HostResult = std::result::Result<Vec<u8>, String>;

/// Boxed future of an async host function.
pub type HostFuture = Pin<Box<dyn Future<Output = HostResult> + Send>>;

type SyncFn = dyn Fn(&HostCallContext, &[u8]) -> HostResult + Send + Sync;
type AsyncFn = dyn Fn(HostCallContext, Vec<u8>) -> HostFuture + Send + Sync;

#[derive(Clone)]
enum Handler {
    Sync(Arc<SyncFn>),
    Async(Arc<AsyncFn>),
}

/// Registered host functions and the pool that runs them.
pub(crate) struct HostApi {
    functions: RwLock<HashMap<String, Handler>>,
    pool: ThreadPool,
}

impl HostApi {
    pub(crate) fn new(threads: usize) -> Result<HostApi> {
        let pool = ThreadPool::builder()
            .pool_size(threads.max(1))
            .name_prefix("roma-host-api-")
            .create()
            .map_err(|e| Error::io("start the host API thread pool", e))?;
        Ok(HostApi { functions: RwLock::new(HashMap::new()), pool })
    }

    fn insert(&self, name: String, handler: Handler) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("a host function needs a name".into()));
        }
        let mut map = self.functions.write().map_err(|_| Error::Internal("host API registry poisoned".into()))?;
        if map.contains_key(&name) {
            return Err(Error::InvalidArgument(format!(
                "host function {name:?} is already registered; unregister it first"
            )));
        }
        map.insert(name, handler);
        Ok(())
    }

    pub(crate) fn register_sync(&self, name: String, f: Arc<SyncFn>) -> Result<()> {
        self.insert(name, Handler::Sync(f))
    }

    pub(crate) fn register_async(&self, name: String, f: Arc<AsyncFn>) -> Result<()> {
        self.insert(name, Handler::Async(f))
    }

    pub(crate) fn unregister(&self, name: &str) -> Result<()> {
        let mut map = self.functions.write().map_err(|_| Error::Internal("host API registry poisoned".into()))?;
        map.remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(format!("host function {name:?} is not registered")))
    }

    /// Runs `function` on the pool and hands the result to `done` (on a pool thread).
    pub(crate) fn call(
        &self,
        function: &str,
        ctx: HostCallContext,
        request: Vec<u8>,
        done: impl FnOnce(HostResult) + Send + 'static,
    ) {
        let handler = self.functions.read().ok().and_then(|m| m.get(function).cloned());
        let Some(handler) = handler else {
            done(Err(format!("unknown host function {function:?}")));
            return;
        };
        let name = function.to_string();
        self.pool.spawn_ok(async move {
            use futures_util_shim::CatchUnwindFuture;
            let result = match handler {
                Handler::Sync(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&ctx, &request)))
                    .unwrap_or_else(|_| Err(format!("host function {name:?} panicked"))),
                Handler::Async(f) => {
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(ctx, request))) {
                        Ok(fut) => CatchUnwindFuture(fut)
                            .await
                            .unwrap_or_else(|| Err(format!("host function {name:?} panicked"))),
                        Err(_) => Err(format!("host function {name:?} panicked")),
                    }
                }
            };
            done(result);
        });
    }
}

/// A minimal catch-unwind wrapper for a boxed future (no extra dependency).
mod futures_util_shim {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct CatchUnwindFuture<F>(pub Pin<Box<F>>)
    where
        F: Future + ?Sized;

    impl<F: Future + ?Sized> Future for CatchUnwindFuture<F> {
        type Output = Option<F::Output>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let inner = self.0.as_mut();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(v)) => Poll::Ready(Some(v)),
                Err(_) => Poll::Ready(None),
            }
        }
    }
}

/// Generated types of proto/host_api.proto (the call and reply frames).
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/roma_byob.host_api.rs"));
}
