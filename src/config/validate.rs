//! Stage 3: the raw config checked and resolved into `Config`, with errors
//! that name the key.

use super::*;

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self.server.listen.parse().map_err(|_| {
            ConfigError::at(
                "server.listen",
                format!(
                    "invalid address {:?} (expected e.g. \"127.0.0.1:8080\")",
                    self.server.listen
                ),
            )
        })?;
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::at("server.max_body_bytes", "must be greater than 0"));
        }
        if self.server.max_passthrough_body_bytes == 0 {
            return Err(ConfigError::at(
                "server.max_passthrough_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.server.max_response_bytes == 0 {
            return Err(ConfigError::at("server.max_response_bytes", "must be greater than 0"));
        }
        let server = ServerConfig {
            listen,
            max_body_bytes: usize::try_from(self.server.max_body_bytes).unwrap_or(usize::MAX),
            max_response_bytes: usize::try_from(self.server.max_response_bytes).unwrap_or(usize::MAX),
            max_passthrough_body_bytes: self.server.max_passthrough_body_bytes,
            shutdown_grace: self.server.shutdown_grace,
            max_in_flight: self.server.max_in_flight,
            send_timeout: self.server.send_timeout,
            request_body_timeout: self.server.request_body_timeout,
            header_read_timeout: self.server.header_read_timeout,
            keepalive_timeout: self.server.keepalive_timeout,
        };
        if server.max_in_flight == 0 {
            return Err(ConfigError::at("server.max_in_flight", "must be at least 1"));
        }
        all_positive([
            ("server.send_timeout", server.send_timeout),
            ("server.request_body_timeout", server.request_body_timeout),
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.keepalive_timeout", server.keepalive_timeout),
        ])?;

        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(ConfigError::at(
                "retry.max_attempts",
                "must be at least 1 (1 means no retries)",
            ));
        }
        if r.max_delay < r.base_delay {
            return Err(ConfigError::at("retry.max_delay", "must be at least base_delay"));
        }
        if !(0.0..=1000.0).contains(&r.budget_ratio) || !r.budget_ratio.is_finite() {
            return Err(ConfigError::at("retry.budget_ratio", "must be between 0 and 1000"));
        }
        let retry = RetryConfig {
            max_attempts: r.max_attempts,
            base_delay: r.base_delay,
            max_delay: r.max_delay,
            budget_ratio: r.budget_ratio,
            min_retries_per_second: r.min_retries_per_second,
            retry_after_cap: r.retry_after_cap,
        };
        let breaker = self
            .circuit_breaker
            .resolve(&BreakerConfig::default(), "circuit_breaker")?;

        let admin_key = match self.admin.and_then(|a| a.key) {
            Some(k) if k.expose().is_empty() => {
                return Err(ConfigError::at(
                    "admin.key",
                    "is empty; remove [admin] to turn the admin API off",
                ))
            }
            other => other,
        };

        if self.upstreams.is_empty() {
            return Err(ConfigError::at(
                "upstreams",
                "at least one [[upstreams]] entry is required",
            ));
        }
        let mut upstreams = Vec::with_capacity(self.upstreams.len());
        let mut seen = HashSet::new();
        for (i, u) in self.upstreams.into_iter().enumerate() {
            let at = |key: &str| format!("upstreams[{i}].{key}");
            check_name(&at("name"), &u.name)?;
            if !seen.insert(u.name.clone()) {
                return Err(ConfigError::at(
                    &at("name"),
                    format!("duplicate upstream name {:?}", u.name),
                ));
            }
            let base_url = validate_base_url(&at("base_url"), &u.base_url)?;
            all_positive(
                [
                    ("connect_timeout", u.connect_timeout),
                    ("first_byte_timeout", u.first_byte_timeout),
                    ("idle_timeout", u.idle_timeout),
                    ("request_timeout", u.request_timeout),
                ]
                .map(|(key, d)| (at(key), d)),
            )?;
            if u.first_byte_timeout > u.request_timeout {
                return Err(ConfigError::at(
                    &at("first_byte_timeout"),
                    "is longer than request_timeout, which bounds the whole request",
                ));
            }
            upstreams.push(UpstreamConfig {
                name: u.name,
                base_url,
                api_key: u.api_key.filter(|k| !k.expose().is_empty()),
                connect_timeout: u.connect_timeout,
                first_byte_timeout: u.first_byte_timeout,
                idle_timeout: u.idle_timeout,
                request_timeout: u.request_timeout,
                max_concurrency: u.max_concurrency,
                http_version: u.http_version,
                circuit_breaker: match &u.circuit_breaker {
                    Some(over) => over.resolve(&breaker, &at("circuit_breaker"))?,
                    None => breaker.clone(),
                },
            });
        }
        let upstream_index: HashMap<&str, usize> = upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.as_str(), i))
            .collect();

        if self.models.is_empty() {
            return Err(ConfigError::at("models", "at least one [[models]] entry is required"));
        }
        let mut models = Vec::with_capacity(self.models.len());
        let mut model_caches = Vec::with_capacity(self.models.len());
        let mut seen = HashSet::new();
        for (i, m) in self.models.into_iter().enumerate() {
            let at = |key: &str| format!("models[{i}].{key}");
            check_name(&at("name"), &m.name)?;
            if m.name == crate::telemetry::metrics::OTHER {
                return Err(ConfigError::at(
                    &at("name"),
                    "\"other\" is reserved for unknown models in metrics",
                ));
            }
            if !seen.insert(m.name.clone()) {
                return Err(ConfigError::at(
                    &at("name"),
                    format!("duplicate model name {:?}", m.name),
                ));
            }
            if m.targets.is_empty() {
                return Err(ConfigError::at(&at("targets"), "at least one target is required"));
            }
            let routing = validate_routing(&m, i)?;
            check_price(&at("price"), m.price.as_ref())?;
            let mut targets = Vec::with_capacity(m.targets.len());
            for (j, t) in m.targets.into_iter().enumerate() {
                let at = |key: &str| format!("models[{i}].targets[{j}].{key}");
                let Some(&upstream) = upstream_index.get(t.upstream.as_str()) else {
                    return Err(ConfigError::at(
                        &at("upstream"),
                        format!("unknown upstream {:?} (not in [[upstreams]])", t.upstream),
                    ));
                };
                if t.weight == 0 {
                    return Err(ConfigError::at(&at("weight"), "must be at least 1"));
                }
                let model = t.model.unwrap_or_else(|| m.name.clone());
                if model.is_empty() {
                    return Err(ConfigError::at(&at("model"), "must not be empty"));
                }
                check_price(&at("price"), t.price.as_ref())?;
                let price = t.price.or(m.price);
                if routing.strategy == Strategy::Cost && price.is_none() {
                    return Err(ConfigError::at(
                        &at("price"),
                        format!(
                            "routing = \"cost\" ranks targets by price, and target {:?} (model {:?}) has none, \
                             nor has the model (set price on the target or on the model)",
                            t.upstream, model
                        ),
                    ));
                }
                targets.push(TargetConfig {
                    upstream,
                    model,
                    priority: t.priority,
                    weight: t.weight,
                    price,
                });
            }
            targets.sort_by_key(|t| t.priority);
            let hedge = match m.hedge_after.as_deref().map(str::trim) {
                None => None,
                Some("p95") => Some(Hedge::P95),
                Some(text) => match humantime::parse_duration(text) {
                    Ok(d) if !d.is_zero() => Some(Hedge::After(d)),
                    _ => {
                        return Err(ConfigError::at(
                            &at("hedge_after"),
                            format!("invalid value {text:?} (expected a duration like \"800ms\" or \"p95\")"),
                        ))
                    }
                },
            };
            if hedge.is_some() && targets.len() < 2 {
                return Err(ConfigError::at(
                    &at("hedge_after"),
                    "hedging needs at least two targets",
                ));
            }
            let shadow = match m.shadow {
                None => None,
                Some(sh) => {
                    let Some(&upstream) = upstream_index.get(sh.upstream.as_str()) else {
                        return Err(ConfigError::at(
                            &at("shadow.upstream"),
                            format!("unknown upstream {:?} (not in [[upstreams]])", sh.upstream),
                        ));
                    };
                    if !(0.0..=1.0).contains(&sh.sample) {
                        return Err(ConfigError::at(&at("shadow.sample"), "must be between 0 and 1"));
                    }
                    if sh.max_in_flight == 0 {
                        return Err(ConfigError::at(&at("shadow.max_in_flight"), "must be at least 1"));
                    }
                    Some(ShadowConfig {
                        upstream,
                        model: sh.model.unwrap_or_else(|| m.name.clone()),
                        sample: sh.sample,
                        max_in_flight: sh.max_in_flight,
                        price: sh.price.or(m.price),
                    })
                }
            };
            let cache = match m.cache {
                None => None,
                Some(c) => {
                    let when = match c.when.as_str() {
                        "deterministic" => CacheWhen::Deterministic,
                        "always" => CacheWhen::Always,
                        other => {
                            return Err(ConfigError::at(
                                &at("cache.when"),
                                format!("unknown value {other:?} (expected \"deterministic\" or \"always\")"),
                            ))
                        }
                    };
                    if c.ttl.is_some_and(|t| t.is_zero()) {
                        return Err(ConfigError::at(&at("cache.ttl"), "must be greater than 0"));
                    }
                    // The section's ttl is filled in below, once it is read.
                    Some((c.ttl, when))
                }
            };
            model_caches.push(cache);
            models.push(ModelConfig {
                name: m.name,
                targets,
                price: m.price,
                hedge,
                shadow,
                cache: None,
                routing,
            });
        }

        let mut keys = Vec::with_capacity(self.keys.len());
        let mut seen = HashSet::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            let at = |key: &str| format!("keys[{i}].{key}");
            check_name(&at("name"), &k.name)?;
            if !seen.insert(k.name.clone()) {
                return Err(ConfigError::at(&at("name"), format!("duplicate key name {:?}", k.name)));
            }
            if k.key.expose().len() < 8 {
                return Err(ConfigError::at(&at("key"), "is shorter than 8 characters"));
            }
            keys.push(KeyConfig {
                name: k.name,
                key: k.key,
            });
        }
        let mut secrets = HashSet::new();
        if keys.iter().any(|k| !secrets.insert(k.key.expose())) {
            return Err(ConfigError::at("keys", "two client keys have the same secret"));
        }

        let (rate_limit, rate_limits) =
            crate::ratelimit::validate(self.rate_limit, self.rate_limits).map_err(ConfigError::new)?;
        crate::ratelimit::check_matches(&rate_limits, |scope, name| match scope {
            crate::ratelimit::Scope::Key => keys.iter().any(|k| k.name == name),
            crate::ratelimit::Scope::Model => models.iter().any(|m| m.name == name),
            crate::ratelimit::Scope::Upstream => upstreams.iter().any(|u| u.name == name),
            crate::ratelimit::Scope::Global => true,
        })
        .map_err(ConfigError::new)?;
        let (budget, budgets) =
            crate::budget::validate(self.budget, self.budgets, &rate_limit).map_err(ConfigError::new)?;
        crate::budget::check_matches(&budgets, |scope, name| match scope {
            crate::ratelimit::Scope::Key => keys.iter().any(|k| k.name == name),
            crate::ratelimit::Scope::Model => models.iter().any(|m| m.name == name),
            crate::ratelimit::Scope::Upstream => upstreams.iter().any(|u| u.name == name),
            crate::ratelimit::Scope::Global => true,
        })
        .map_err(ConfigError::new)?;

        let ledger = match self.ledger {
            None => None,
            Some(l) if l.path.as_os_str().is_empty() => {
                return Err(ConfigError::at(
                    "ledger.path",
                    "must not be empty; remove [ledger] to turn it off",
                ))
            }
            Some(l) => Some(LedgerConfig {
                path: l.path,
                capacity: l.capacity.max(1),
            }),
        };
        let otel = match self.otel {
            None => None,
            Some(o) => {
                crate::telemetry::otel::check_endpoint(&o.endpoint).map_err(|e| ConfigError::at("otel.endpoint", e))?;
                Some(OtelConfig {
                    endpoint: o.endpoint,
                    service_name: o.service_name,
                })
            }
        };
        let h = self.health;
        if h.window < Duration::from_secs(20) {
            return Err(ConfigError::at("health.window", "must be at least 20s"));
        }
        for (key, v) in [
            ("degraded_below", h.degraded_below),
            ("unhealthy_below", h.unhealthy_below),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(ConfigError::at(&format!("health.{key}"), "must be between 0 and 1"));
            }
        }
        if h.unhealthy_below > h.degraded_below {
            return Err(ConfigError::at(
                "health.unhealthy_below",
                "must not be above degraded_below",
            ));
        }
        let health = HealthConfig {
            window: h.window,
            degraded_below: h.degraded_below,
            unhealthy_below: h.unhealthy_below,
        };

        let cache = validate_cache(self.cache, model_caches.iter().any(Option::is_some), &rate_limit)?;
        if let Some(c) = &cache {
            for (m, opt_in) in models.iter_mut().zip(model_caches) {
                m.cache = opt_in.map(|(ttl, when)| ModelCache {
                    ttl: ttl.unwrap_or(c.ttl),
                    when,
                });
            }
        }
        let passthrough = match self.passthrough {
            None => None,
            Some(p) => Some(validate_passthrough(p, &upstream_index)?),
        };
        Ok(Config {
            passthrough,
            cache,
            server,
            admin_key,
            upstreams,
            models,
            keys,
            retry,
            rate_limit,
            rate_limits,
            budget,
            budgets,
            ledger,
            otel,
            health,
        })
    }
}

fn validate_passthrough(
    raw: RawPassthrough,
    upstream_index: &HashMap<&str, usize>,
) -> Result<PassthroughConfig, ConfigError> {
    let Some(&upstream) = upstream_index.get(raw.upstream.as_str()) else {
        return Err(ConfigError::at(
            "passthrough.upstream",
            format!("unknown upstream {:?} (not in [[upstreams]])", raw.upstream),
        ));
    };
    let paths = match raw.paths {
        None => None,
        Some(paths) => {
            if paths.is_empty() {
                return Err(ConfigError::at(
                    "passthrough.paths",
                    "must not be empty (leave it out to pass every other /v1/* path)",
                ));
            }
            let mut patterns = Vec::with_capacity(paths.len());
            for (i, p) in paths.into_iter().enumerate() {
                let at = format!("passthrough.paths[{i}]");
                let (path, prefix) = match p.strip_suffix('*') {
                    Some(prefix) => (prefix, true),
                    None => (p.as_str(), false),
                };
                if !path.starts_with("/v1/") || path.contains('*') || path.contains('?') {
                    return Err(ConfigError::at(
                        &at,
                        format!("{p:?} is not a /v1/ path, or a /v1/ prefix ending in one '*'"),
                    ));
                }
                patterns.push(if prefix {
                    PathPattern::Prefix(path.to_owned())
                } else {
                    PathPattern::Exact(path.to_owned())
                });
            }
            Some(patterns)
        }
    };
    Ok(PassthroughConfig { upstream, paths })
}

/// `[cache]`, or its defaults when only models opt in.
fn validate_cache(
    raw: Option<RawCache>,
    models_opt_in: bool,
    rate_limit: &crate::ratelimit::RateLimitSettings,
) -> Result<Option<CacheConfig>, ConfigError> {
    let raw = match raw {
        Some(raw) => raw,
        None if models_opt_in => RawCache::default(),
        None => return Ok(None),
    };
    let backend = match raw.backend.as_str() {
        "memory" => {
            if raw.redis_url.is_some() {
                return Err(ConfigError::at(
                    "cache.redis_url",
                    "set, but backend is \"memory\" (set backend = \"redis\" or remove it)",
                ));
            }
            if raw.max_bytes == 0 {
                return Err(ConfigError::at("cache.max_bytes", "must be greater than 0"));
            }
            CacheBackend::Memory {
                max_bytes: raw.max_bytes,
            }
        }
        "redis" => {
            let url = match (raw.redis_url, &rate_limit.backend) {
                (Some(url), _) => url,
                (None, crate::ratelimit::Backend::Redis { url }) => url.clone(),
                (None, crate::ratelimit::Backend::Local) => {
                    return Err(ConfigError::at(
                        "cache.redis_url",
                        "required with backend = \"redis\" (or set [rate_limit] redis_url to share it)",
                    ))
                }
            };
            if redis::Client::open(url.expose_secret()).is_err() {
                return Err(ConfigError::at(
                    "cache.redis_url",
                    "not a valid Redis URL (expected redis://host:port, rediss://host:port or redis+unix:///path)",
                ));
            }
            CacheBackend::Redis {
                url,
                timeout: raw.redis_timeout.unwrap_or(rate_limit.redis_timeout),
                key_prefix: rate_limit.key_prefix.clone(),
            }
        }
        other => {
            return Err(ConfigError::at(
                "cache.backend",
                format!("unknown backend {other:?} (expected memory or redis)"),
            ))
        }
    };
    if raw.redis_timeout.is_some_and(|t| t.is_zero()) {
        return Err(ConfigError::at("cache.redis_timeout", "must be greater than 0"));
    }
    if raw.ttl.is_zero() {
        return Err(ConfigError::at("cache.ttl", "must be greater than 0"));
    }
    if raw.max_entry_bytes == 0 {
        return Err(ConfigError::at("cache.max_entry_bytes", "must be greater than 0"));
    }
    let scope = match raw.scope.as_str() {
        "key" => CacheScope::Key,
        "global" => CacheScope::Global,
        other => {
            return Err(ConfigError::at(
                "cache.scope",
                format!("unknown scope {other:?} (expected key or global)"),
            ))
        }
    };
    Ok(Some(CacheConfig {
        backend,
        max_entry_bytes: usize::try_from(raw.max_entry_bytes).unwrap_or(usize::MAX),
        ttl: raw.ttl,
        scope,
    }))
}

/// `routing`, `routing_decay` and `max_ttft` of model `i`.
fn validate_routing(m: &RawModel, i: usize) -> Result<Routing, ConfigError> {
    let at = |key: &str| format!("models[{i}].{key}");
    let strategy = match m.routing.as_deref().map(str::trim) {
        None | Some("priority") => Strategy::Priority,
        Some("latency") => Strategy::Latency,
        Some("cost") => Strategy::Cost,
        Some(other) => {
            return Err(ConfigError::at(
                &at("routing"),
                format!("unknown strategy {other:?} (expected \"priority\", \"latency\" or \"cost\")"),
            ))
        }
    };
    if strategy == Strategy::Priority && m.routing_decay.is_some() {
        return Err(ConfigError::at(
            &at("routing_decay"),
            "applies only with routing = \"latency\" or \"cost\"",
        ));
    }
    if strategy != Strategy::Cost && m.max_ttft.is_some() {
        return Err(ConfigError::at(&at("max_ttft"), "applies only with routing = \"cost\""));
    }
    let decay = m.routing_decay.unwrap_or(Routing::default().decay);
    if decay < Duration::from_millis(100) {
        return Err(ConfigError::at(&at("routing_decay"), "must be at least 100ms"));
    }
    if m.max_ttft.is_some_and(|d| d.is_zero()) {
        return Err(ConfigError::at(&at("max_ttft"), "must be greater than 0"));
    }
    Ok(Routing {
        strategy,
        decay,
        max_ttft: m.max_ttft,
    })
}

fn check_price(path: &str, price: Option<&Price>) -> Result<(), ConfigError> {
    if let Some(p) = price {
        let prices = [Some(p.input_per_mtok), Some(p.output_per_mtok), p.cached_input_per_mtok];
        if prices.into_iter().flatten().any(|v| !v.is_finite() || v < 0.0) {
            return Err(ConfigError::at(path, "prices must be finite and not negative"));
        }
    }
    Ok(())
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::at(
            path,
            format!("invalid name {name:?} (1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ . : /)"),
        ))
    }
}

/// Every duration greater than zero, or an error at the first key that is not.
fn all_positive<K: AsRef<str>>(durations: impl IntoIterator<Item = (K, Duration)>) -> Result<(), ConfigError> {
    for (key, d) in durations {
        if d.is_zero() {
            return Err(ConfigError::at(key.as_ref(), "must be greater than 0"));
        }
    }
    Ok(())
}

fn validate_base_url(path: &str, url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ConfigError::at(path, format!("invalid URL {url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ConfigError::at(
            path,
            format!("invalid URL {url:?}: expected http:// or https:// with a host"),
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ConfigError::at(path, "must not have a query or fragment"));
    }
    let base = url.trim_end_matches('/');
    // The upstream client takes an `http::Uri`, which is stricter than a URL
    // parser (it takes no raw non-ASCII, for one).
    if http::Uri::try_from(format!("{base}/chat/completions")).is_err() {
        return Err(ConfigError::at(
            path,
            format!("invalid URL {url:?}: not a valid HTTP URI (write a non-ASCII host in punycode, xn--…)"),
        ));
    }
    Ok(base.to_owned())
}
