use super::queue::Shared;
use super::service::BulkheadService;
use super::ticket::QueueTicket;
use crate::classify::ErrorClassifier;
#[cfg(feature = "http")]
use crate::guard::OnBodyEnd;
use crate::guard::OnResponse;
use crate::guard::OnStreamEnd;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::Arc;
use tower_layer::Layer;

/// What the bulkhead reads from a request: its priority, its partition key and
/// the ticket to report its place in line to. The default, [`NoInfo`], reads
/// nothing and costs nothing.
pub trait RequestInfo<Req>: Clone {
    /// Higher is served first (default 0).
    fn priority(&self, _req: &Req) -> i32 {
        0
    }

    /// The partition (tenant, user, API key) as a hash, or `None`.
    fn partition(&self, _req: &Req, _hasher: &RandomState) -> Option<u64> {
        None
    }

    /// Where to report this request's place in line.
    fn ticket(&self, _req: &Req) -> Option<QueueTicket> {
        None
    }
}

/// Reads nothing from requests: one line, FIFO, no partitions.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInfo;

impl<Req> RequestInfo<Req> for NoInfo {}

type PriorityFn<Req> = Arc<dyn Fn(&Req) -> i32 + Send + Sync>;
type PartitionFn<Req> = Arc<dyn Fn(&Req, &RandomState) -> u64 + Send + Sync>;
type TicketFn<Req> = Arc<dyn Fn(&Req) -> Option<QueueTicket> + Send + Sync>;

/// Closures that read priority, partition and ticket from a `Req`.
/// Built through [`BulkheadLayer::priority`], [`BulkheadLayer::partition`] and
/// [`BulkheadLayer::ticket`].
pub struct InfoFns<Req> {
    priority: Option<PriorityFn<Req>>,
    partition: Option<PartitionFn<Req>>,
    ticket: Option<TicketFn<Req>>,
}

impl<Req> Clone for InfoFns<Req> {
    fn clone(&self) -> Self {
        InfoFns {
            priority: self.priority.clone(),
            partition: self.partition.clone(),
            ticket: self.ticket.clone(),
        }
    }
}

impl<Req> fmt::Debug for InfoFns<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InfoFns")
            .field("priority", &self.priority.is_some())
            .field("partition", &self.partition.is_some())
            .field("ticket", &self.ticket.is_some())
            .finish()
    }
}

impl<Req> RequestInfo<Req> for InfoFns<Req> {
    fn priority(&self, req: &Req) -> i32 {
        self.priority.as_ref().map_or(0, |f| f(req))
    }

    fn partition(&self, req: &Req, hasher: &RandomState) -> Option<u64> {
        self.partition.as_ref().map(|f| f(req, hasher))
    }

    fn ticket(&self, req: &Req) -> Option<QueueTicket> {
        self.ticket.as_ref().and_then(|f| f(req))
    }
}

/// The tower [`Layer`] of a [`Bulkhead`](super::Bulkhead); every service it
/// makes shares the bulkhead's permits and line.
#[must_use = "a layer does nothing until it wraps a service"]
pub struct BulkheadLayer<X = NoInfo, R = OnResponse, C = ErrorClassifier> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) info: X,
    pub(crate) classify: C,
    pub(crate) _release: PhantomData<fn() -> R>,
}

impl<X: Clone, R, C: Clone> Clone for BulkheadLayer<X, R, C> {
    fn clone(&self) -> Self {
        BulkheadLayer {
            shared: self.shared.clone(),
            info: self.info.clone(),
            classify: self.classify.clone(),
            _release: PhantomData,
        }
    }
}

impl<X: fmt::Debug, R, C> fmt::Debug for BulkheadLayer<X, R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadLayer")
            .field("name", &self.shared.cfg.obs.name)
            .field("info", &self.info)
            .field("release", &std::any::type_name::<R>())
            .finish()
    }
}

impl<S, X: Clone, R, C: Clone> Layer<S> for BulkheadLayer<X, R, C> {
    type Service = BulkheadService<S, X, R, C>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            shared: self.shared.clone(),
            info: self.info.clone(),
            classify: self.classify.clone(),
            _release: PhantomData,
        }
    }
}

impl<X, R, C> BulkheadLayer<X, R, C> {
    fn with_release<R2>(self) -> BulkheadLayer<X, R2, C> {
        BulkheadLayer {
            shared: self.shared,
            info: self.info,
            classify: self.classify,
            _release: PhantomData,
        }
    }

    /// Hold each permit until the response `Stream` ends, fails or is dropped.
    pub fn release_on_stream_end(self) -> BulkheadLayer<X, OnStreamEnd, C> {
        self.with_release()
    }

    /// Hold each permit until the `http::Response` body ends, fails or is dropped.
    #[cfg(feature = "http")]
    pub fn release_on_body_end(self) -> BulkheadLayer<X, OnBodyEnd, C> {
        self.with_release()
    }

    /// How a call's result is classified for an adaptive limit
    /// ([`BulkheadBuilder::limit`](super::BulkheadBuilder::limit); default
    /// [`ErrorClassifier`]: an `Ok` is a success). Give the classifier of
    /// your responses (`HttpClassifier`, `LlmClassifier`: a `529` is then
    /// a drop). A fixed limit never classifies.
    pub fn classify<C2>(self, classify: C2) -> BulkheadLayer<X, R, C2> {
        BulkheadLayer {
            shared: self.shared,
            info: self.info,
            classify,
            _release: PhantomData,
        }
    }
}

impl<R, C> BulkheadLayer<NoInfo, R, C> {
    fn into_fns<Req>(self) -> BulkheadLayer<InfoFns<Req>, R, C> {
        BulkheadLayer {
            shared: self.shared,
            info: InfoFns {
                priority: None,
                partition: None,
                ticket: None,
            },
            classify: self.classify,
            _release: PhantomData,
        }
    }

    /// Serve higher priorities first (see the module docs for the starvation guard).
    pub fn priority<Req, F>(self, f: F) -> BulkheadLayer<InfoFns<Req>, R, C>
    where
        F: Fn(&Req) -> i32 + Send + Sync + 'static,
    {
        self.into_fns().priority(f)
    }

    /// Partition by a key (tenant, user, API key): each key gets at most the
    /// builder's `max_per_key` permits, inside the global `max_concurrent`.
    pub fn partition<Req, K, F>(self, f: F) -> BulkheadLayer<InfoFns<Req>, R, C>
    where
        K: Hash,
        F: Fn(&Req) -> K + Send + Sync + 'static,
    {
        self.into_fns().partition(f)
    }

    /// Report each request's place in line to the ticket it carries.
    pub fn ticket<Req, F>(self, f: F) -> BulkheadLayer<InfoFns<Req>, R, C>
    where
        F: Fn(&Req) -> Option<QueueTicket> + Send + Sync + 'static,
    {
        self.into_fns().ticket(f)
    }
}

impl<Req, R, C> BulkheadLayer<InfoFns<Req>, R, C> {
    /// See [`BulkheadLayer::priority`].
    pub fn priority<F>(mut self, f: F) -> Self
    where
        F: Fn(&Req) -> i32 + Send + Sync + 'static,
    {
        self.info.priority = Some(Arc::new(f));
        self
    }

    /// See [`BulkheadLayer::partition`]. Keys are hashed with a per-bulkhead
    /// random SipHash key (`RandomState`), so a client cannot pick keys that
    /// collide with another tenant's.
    pub fn partition<K, F>(mut self, f: F) -> Self
    where
        K: Hash,
        F: Fn(&Req) -> K + Send + Sync + 'static,
    {
        self.info.partition = Some(Arc::new(move |req: &Req, hasher: &RandomState| {
            hasher.hash_one(f(req))
        }));
        self
    }

    /// See [`BulkheadLayer::ticket`].
    pub fn ticket<F>(mut self, f: F) -> Self
    where
        F: Fn(&Req) -> Option<QueueTicket> + Send + Sync + 'static,
    {
        self.info.ticket = Some(Arc::new(f));
        self
    }
}

#[cfg(feature = "http")]
impl<R, C> BulkheadLayer<NoInfo, R, C> {
    /// Reads the [`QueueTicket`] from `http::Request` extensions.
    pub fn ticket_from_extensions<B: 'static>(
        self,
    ) -> BulkheadLayer<InfoFns<http::Request<B>>, R, C> {
        self.ticket(|req: &http::Request<B>| req.extensions().get::<QueueTicket>().cloned())
    }

    /// Reads both the [`QueueTicket`] and the [`Priority`] from
    /// `http::Request` extensions (no `Priority`: 0). The LLM preset's
    /// bulkhead reads its requests this way.
    ///
    /// ```
    /// use semaforo::bulkhead::{Bulkhead, Priority};
    ///
    /// let bulkhead = Bulkhead::builder(50).max_queue(1_000).min_share(1.., 0.8).build()?;
    /// let layer = bulkhead.layer().from_extensions::<String>();
    /// let mut req = http::Request::new(String::from("plan the water cycle"));
    /// req.extensions_mut().insert(Priority(1)); // interactive
    /// # let _ = layer;
    /// # Ok::<(), semaforo::ConfigError>(())
    /// ```
    pub fn from_extensions<B: 'static>(self) -> BulkheadLayer<InfoFns<http::Request<B>>, R, C> {
        self.ticket_from_extensions()
            .priority(|req: &http::Request<B>| {
                req.extensions().get::<Priority>().map_or(0, |p| p.0)
            })
    }
}

/// A request's priority for the bulkhead's line, as an `http::Request`
/// extension (read by [`BulkheadLayer::from_extensions`] and the LLM
/// preset): higher is served first; see
/// [`BulkheadBuilder::min_share`](super::BulkheadBuilder::min_share) for
/// guaranteed shares per priority class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub i32);
