//! The validated configuration and the pure state machine that changes it.
//!
//! Both the config loader (building a [`State`] from a file) and the admin API (applying a
//! [`Command`]) go through here, so a state that exists is always valid. [`State::apply`] never
//! mutates: it returns the next state and a description of the [`Change`], or an error and the
//! caller keeps the old state. Routing snapshots are built from a `State` by
//! [`crate::RoutingTable::build`].

use std::collections::BTreeMap;

use crate::canary::Canary;
use crate::error::{CommandError, ValidationError};
use crate::model::{Backend, BackendUpdate, VirtualHost, VirtualHostUpdate};
use crate::names::{BackendId, DomainName, Tag};

/// A valid set of virtual hosts and backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    vhosts: BTreeMap<DomainName, VirtualHost>,
    backends: BTreeMap<BackendId, Backend>,
}

/// One change request, as sent by the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create a virtual host.
    AddDomain(VirtualHost),
    /// Change some fields of a virtual host.
    UpdateDomain {
        /// The domain to change.
        domain: DomainName,
        /// The fields to change.
        update: VirtualHostUpdate,
    },
    /// Remove a virtual host.
    DeleteDomain(DomainName),
    /// Create a backend.
    AddBackend(Backend),
    /// Change some fields of a backend.
    UpdateBackend {
        /// The backend to change.
        id: BackendId,
        /// The fields to change.
        update: BackendUpdate,
        /// Allow leaving a domain's active tag without backends.
        force: bool,
    },
    /// Remove a backend.
    DeleteBackend {
        /// The backend to remove.
        id: BackendId,
        /// Allow leaving a domain's active tag without backends.
        force: bool,
    },
    /// Point a domain at another tag (the A/B switch); switching to the canary's tag ends the
    /// canary.
    SwitchTag {
        /// The domain.
        domain: DomainName,
        /// Its new active tag.
        tag: Tag,
    },
    /// Set (or replace) a domain's canary.
    SetCanary {
        /// The domain.
        domain: DomainName,
        /// The canary.
        canary: Canary,
    },
    /// Remove a domain's canary: all traffic back to the primary tag.
    RemoveCanary(DomainName),
    /// Make the canary's tag the primary and remove the canary, in one change.
    PromoteCanary(DomainName),
}

/// What a successful [`Command`] did; enough to persist it and to log it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A virtual host was created.
    DomainAdded(VirtualHost),
    /// A virtual host was changed (a tag switch is reported as [`Change::TagSwitched`]).
    DomainUpdated {
        /// Before the change.
        before: VirtualHost,
        /// After the change.
        after: VirtualHost,
    },
    /// A virtual host was removed.
    DomainDeleted(VirtualHost),
    /// A backend was created.
    BackendAdded(Backend),
    /// A backend was changed.
    BackendUpdated {
        /// Before the change.
        before: Backend,
        /// After the change.
        after: Backend,
    },
    /// A backend was removed.
    BackendDeleted(Backend),
    /// A domain's active tag changed.
    TagSwitched {
        /// The domain after the switch.
        vhost: VirtualHost,
        /// The previous tag.
        from: Tag,
    },
}

impl State {
    /// Builds a state from records, checking every record and the uniqueness of domains and ids.
    pub fn new(vhosts: Vec<VirtualHost>, backends: Vec<Backend>) -> Result<Self, ValidationError> {
        let mut state = Self::default();
        for vhost in vhosts {
            vhost.validate()?;
            if state.vhosts.contains_key(&vhost.domain) {
                return Err(ValidationError::DuplicateDomain {
                    domain: vhost.domain,
                });
            }
            state.vhosts.insert(vhost.domain.clone(), vhost);
        }
        for backend in backends {
            backend.validate()?;
            if state.backends.contains_key(&backend.id) {
                return Err(ValidationError::DuplicateBackend { id: backend.id });
            }
            state.backends.insert(backend.id.clone(), backend);
        }
        Ok(state)
    }

    /// All virtual hosts, ordered by domain.
    pub fn vhosts(&self) -> impl ExactSizeIterator<Item = &VirtualHost> {
        self.vhosts.values()
    }

    /// All backends, ordered by id.
    pub fn backends(&self) -> impl ExactSizeIterator<Item = &Backend> {
        self.backends.values()
    }

    /// One virtual host.
    pub fn vhost(&self, domain: &DomainName) -> Option<&VirtualHost> {
        self.vhosts.get(domain)
    }

    /// One backend.
    pub fn backend(&self, id: &BackendId) -> Option<&Backend> {
        self.backends.get(id)
    }

    /// Backends carrying `tag`, ordered by id.
    pub fn backends_with_tag<'a>(&'a self, tag: &'a Tag) -> impl Iterator<Item = &'a Backend> {
        self.backends.values().filter(move |b| b.has_tag(tag))
    }

    /// Applies a command, returning the next state and what changed; `self` is never modified.
    pub fn apply(&self, command: Command) -> Result<(State, Change), CommandError> {
        let mut next = self.clone();
        let change = match command {
            Command::AddDomain(vhost) => {
                vhost.validate()?;
                if next.vhosts.contains_key(&vhost.domain) {
                    return Err(CommandError::DomainExists {
                        domain: vhost.domain,
                    });
                }
                next.vhosts.insert(vhost.domain.clone(), vhost.clone());
                Change::DomainAdded(vhost)
            }
            Command::UpdateDomain { domain, update } => {
                let before = self.existing_vhost(&domain)?;
                let after = update.applied_to(before);
                after.validate()?;
                next.vhosts.insert(domain, after.clone());
                let only_tag = update.http_to_https.is_none()
                    && update.tls_cert_path.is_none()
                    && update.tls_key_path.is_none()
                    && update.acme.is_none();
                if only_tag && before.enabled_backends_tag != after.enabled_backends_tag {
                    Change::TagSwitched {
                        from: before.enabled_backends_tag.clone(),
                        vhost: after,
                    }
                } else {
                    Change::DomainUpdated {
                        before: before.clone(),
                        after,
                    }
                }
            }
            Command::DeleteDomain(domain) => {
                let before = self.existing_vhost(&domain)?.clone();
                next.vhosts.remove(&domain);
                Change::DomainDeleted(before)
            }
            Command::SwitchTag { domain, tag } => {
                let before = self.existing_vhost(&domain)?;
                let mut after = before.clone();
                if after.canary.as_ref().is_some_and(|c| c.tag == tag) {
                    after.canary = None;
                }
                after.enabled_backends_tag = tag;
                next.vhosts.insert(domain, after.clone());
                Change::TagSwitched {
                    from: before.enabled_backends_tag.clone(),
                    vhost: after,
                }
            }
            Command::SetCanary { domain, canary } => {
                let before = self.existing_vhost(&domain)?;
                let mut after = before.clone();
                after.canary = Some(Box::new(canary));
                after.validate()?;
                next.vhosts.insert(domain, after.clone());
                Change::DomainUpdated {
                    before: before.clone(),
                    after,
                }
            }
            Command::RemoveCanary(domain) => self.end_canary(&mut next, domain, false)?,
            Command::PromoteCanary(domain) => self.end_canary(&mut next, domain, true)?,
            Command::AddBackend(backend) => {
                backend.validate()?;
                if next.backends.contains_key(&backend.id) {
                    return Err(CommandError::BackendExists { id: backend.id });
                }
                next.backends.insert(backend.id.clone(), backend.clone());
                Change::BackendAdded(backend)
            }
            Command::UpdateBackend { id, update, force } => {
                let before = self.existing_backend(&id)?;
                let after = update.applied_to(before);
                after.validate()?;
                next.backends.insert(id.clone(), after.clone());
                if !force {
                    next.check_not_orphaning(self, &id)?;
                }
                Change::BackendUpdated {
                    before: before.clone(),
                    after,
                }
            }
            Command::DeleteBackend { id, force } => {
                let before = self.existing_backend(&id)?.clone();
                next.backends.remove(&id);
                if !force {
                    next.check_not_orphaning(self, &id)?;
                }
                Change::BackendDeleted(before)
            }
        };
        Ok((next, change))
    }

    /// Removes `domain`'s canary from `next`; with `promote`, its tag becomes the primary.
    fn end_canary(
        &self,
        next: &mut State,
        domain: DomainName,
        promote: bool,
    ) -> Result<Change, CommandError> {
        let before = self.existing_vhost(&domain)?;
        let mut after = before.clone();
        let canary = after.canary.take().ok_or_else(|| CommandError::NoCanary {
            domain: domain.clone(),
        })?;
        if promote {
            after.enabled_backends_tag = canary.tag;
        }
        next.vhosts.insert(domain, after.clone());
        Ok(Change::DomainUpdated {
            before: before.clone(),
            after,
        })
    }

    fn existing_vhost(&self, domain: &DomainName) -> Result<&VirtualHost, CommandError> {
        self.vhosts
            .get(domain)
            .ok_or_else(|| CommandError::DomainNotFound {
                domain: domain.clone(),
            })
    }

    fn existing_backend(&self, id: &BackendId) -> Result<&Backend, CommandError> {
        self.backends
            .get(id)
            .ok_or_else(|| CommandError::BackendNotFound { id: id.clone() })
    }

    /// Fails if a domain whose active tag had backends in `before` has none in `self` because of
    /// the change to backend `id`.
    fn check_not_orphaning(&self, before: &State, id: &BackendId) -> Result<(), CommandError> {
        let orphaned: Vec<DomainName> = self
            .vhosts
            .values()
            .filter(|v| {
                let tag = &v.enabled_backends_tag;
                before.backends_with_tag(tag).next().is_some()
                    && self.backends_with_tag(tag).next().is_none()
            })
            .map(|v| v.domain.clone())
            .collect();
        if orphaned.is_empty() {
            Ok(())
        } else {
            Err(CommandError::BackendInUse {
                id: id.clone(),
                domains: orphaned,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::BackendAddress;

    fn d(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }
    fn t(s: &str) -> Tag {
        Tag::parse(s).unwrap()
    }
    fn id(s: &str) -> BackendId {
        BackendId::parse(s).unwrap()
    }
    fn vhost(domain: &str, tag: &str) -> VirtualHost {
        VirtualHost::new(d(domain), t(tag))
    }
    fn backend(i: &str, port: u16, tags: &[&str]) -> Backend {
        Backend::new(
            id(i),
            BackendAddress::parse(&format!("127.0.0.1:{port}")).unwrap(),
            tags.iter().map(|x| t(x)).collect(),
        )
    }
    fn sample() -> State {
        State::new(
            vec![vhost("a.com", "a"), vhost("b.com", "b")],
            vec![
                backend("web-1", 1, &["a"]),
                backend("web-2", 2, &["a", "b"]),
            ],
        )
        .unwrap()
    }

    fn canary(tag: &str, weight: f64) -> Canary {
        Canary::new(
            t(tag),
            crate::CanaryWeight::from_percent(weight).unwrap(),
            crate::StickyKey::Cookie,
        )
    }

    #[test]
    fn canary_set_remove_promote_and_switch() {
        let (s, change) = sample()
            .apply(Command::SetCanary {
                domain: d("a.com"),
                canary: canary("b", 10.0),
            })
            .unwrap();
        assert!(matches!(change, Change::DomainUpdated { .. }));
        assert_eq!(
            s.vhost(&d("a.com")).unwrap().canary,
            Some(Box::new(canary("b", 10.0)))
        );
        // The primary tag cannot be its own canary.
        assert!(matches!(
            s.apply(Command::SetCanary {
                domain: d("a.com"),
                canary: canary("a", 5.0)
            }),
            Err(CommandError::Invalid(
                ValidationError::CanaryIsPrimary { .. }
            ))
        ));
        let (removed, _) = s.apply(Command::RemoveCanary(d("a.com"))).unwrap();
        assert_eq!(removed.vhost(&d("a.com")).unwrap().canary, None);
        assert!(matches!(
            removed.apply(Command::RemoveCanary(d("a.com"))),
            Err(CommandError::NoCanary { .. })
        ));
        let (promoted, _) = s.apply(Command::PromoteCanary(d("a.com"))).unwrap();
        let v = promoted.vhost(&d("a.com")).unwrap();
        assert_eq!(
            (v.enabled_backends_tag.clone(), v.canary.clone()),
            (t("b"), None)
        );
        // Switching to the canary's tag ends the canary; to another tag keeps it.
        let (switched, _) = s
            .apply(Command::SwitchTag {
                domain: d("a.com"),
                tag: t("b"),
            })
            .unwrap();
        assert_eq!(switched.vhost(&d("a.com")).unwrap().canary, None);
        let (s3, _) = s
            .apply(Command::SetCanary {
                domain: d("b.com"),
                canary: canary("a", 1.0),
            })
            .unwrap();
        let (kept, _) = s3
            .apply(Command::SwitchTag {
                domain: d("b.com"),
                tag: t("c"),
            })
            .unwrap();
        assert_eq!(
            kept.vhost(&d("b.com")).unwrap().canary,
            Some(Box::new(canary("a", 1.0)))
        );
    }

    #[test]
    fn new_rejects_duplicates_and_invalid_records() {
        assert_eq!(
            State::new(vec![vhost("a.com", "a"), vhost("A.com.", "b")], vec![]),
            Err(ValidationError::DuplicateDomain { domain: d("a.com") })
        );
        assert_eq!(
            State::new(
                vec![],
                vec![backend("x", 1, &["a"]), backend("x", 2, &["a"])]
            ),
            Err(ValidationError::DuplicateBackend { id: id("x") })
        );
        assert!(matches!(
            State::new(vec![], vec![backend("x", 1, &[])]),
            Err(ValidationError::EmptyTagList { .. })
        ));
    }

    #[test]
    fn add_update_delete_domain() {
        let s = sample();
        let (s2, change) = s.apply(Command::AddDomain(vhost("c.com", "a"))).unwrap();
        assert_eq!(change, Change::DomainAdded(vhost("c.com", "a")));
        assert_eq!(s2.vhosts().len(), 3);
        assert_eq!(s.vhosts().len(), 2, "apply never mutates the original");

        assert_eq!(
            s2.apply(Command::AddDomain(vhost("c.com", "b"))),
            Err(CommandError::DomainExists { domain: d("c.com") })
        );

        let update = VirtualHostUpdate {
            http_to_https: Some(true),
            ..Default::default()
        };
        let (s3, change) = s2
            .apply(Command::UpdateDomain {
                domain: d("c.com"),
                update,
            })
            .unwrap();
        assert!(matches!(change, Change::DomainUpdated { .. }));
        assert!(s3.vhost(&d("c.com")).unwrap().http_to_https);

        let (s4, change) = s3.apply(Command::DeleteDomain(d("c.com"))).unwrap();
        assert!(matches!(change, Change::DomainDeleted(v) if v.domain == d("c.com")));
        assert_eq!(s4, s);
        assert_eq!(
            s4.apply(Command::DeleteDomain(d("c.com"))),
            Err(CommandError::DomainNotFound { domain: d("c.com") })
        );
    }

    #[test]
    fn update_domain_with_only_a_tag_is_a_switch() {
        let update = VirtualHostUpdate {
            enabled_backends_tag: Some(t("b")),
            ..Default::default()
        };
        let (_, change) = sample()
            .apply(Command::UpdateDomain {
                domain: d("a.com"),
                update,
            })
            .unwrap();
        assert!(matches!(change, Change::TagSwitched { from, .. } if from == t("a")));
    }

    #[test]
    fn invalid_update_leaves_state_untouched() {
        let s = sample();
        let update = VirtualHostUpdate {
            tls_cert_path: Some("c.pem".into()),
            ..Default::default()
        };
        let err = s
            .apply(Command::UpdateDomain {
                domain: d("a.com"),
                update,
            })
            .unwrap_err();
        assert!(matches!(
            err,
            CommandError::Invalid(ValidationError::IncompleteTlsPair { .. })
        ));
        assert_eq!(s, sample());
    }

    #[test]
    fn switch_tag() {
        let (s2, change) = sample()
            .apply(Command::SwitchTag {
                domain: d("a.com"),
                tag: t("b"),
            })
            .unwrap();
        assert_eq!(s2.vhost(&d("a.com")).unwrap().enabled_backends_tag, t("b"));
        assert!(matches!(change, Change::TagSwitched { from, .. } if from == t("a")));
        assert!(matches!(
            sample().apply(Command::SwitchTag {
                domain: d("zzz.com"),
                tag: t("b")
            }),
            Err(CommandError::DomainNotFound { .. })
        ));
    }

    #[test]
    fn backend_lifecycle() {
        let s = sample();
        let (s2, _) = s
            .apply(Command::AddBackend(backend("web-3", 3, &["b"])))
            .unwrap();
        assert_eq!(s2.backends_with_tag(&t("b")).count(), 2);
        assert_eq!(
            s2.apply(Command::AddBackend(backend("web-3", 4, &["b"]))),
            Err(CommandError::BackendExists { id: id("web-3") })
        );
        assert!(matches!(
            s2.apply(Command::AddBackend(Backend {
                weight: 0,
                ..backend("web-4", 4, &["b"])
            })),
            Err(CommandError::Invalid(ValidationError::InvalidWeight { .. }))
        ));
        let update = BackendUpdate {
            weight: Some(5),
            ..Default::default()
        };
        let (s3, change) = s2
            .apply(Command::UpdateBackend {
                id: id("web-3"),
                update,
                force: false,
            })
            .unwrap();
        assert!(matches!(change, Change::BackendUpdated { after, .. } if after.weight == 5));
        let (s4, _) = s3
            .apply(Command::DeleteBackend {
                id: id("web-3"),
                force: false,
            })
            .unwrap();
        assert_eq!(s4, s);
        assert_eq!(
            s4.apply(Command::DeleteBackend {
                id: id("web-3"),
                force: false
            }),
            Err(CommandError::BackendNotFound { id: id("web-3") })
        );
    }

    #[test]
    fn deleting_the_last_backend_of_an_active_tag_needs_force() {
        let s = sample();
        // web-2 is the only "b" backend and b.com uses "b".
        let err = s
            .apply(Command::DeleteBackend {
                id: id("web-2"),
                force: false,
            })
            .unwrap_err();
        assert_eq!(
            err,
            CommandError::BackendInUse {
                id: id("web-2"),
                domains: vec![d("b.com")]
            }
        );
        // Retagging it away has the same effect.
        let retag = BackendUpdate {
            tags: Some(vec![t("a")]),
            ..Default::default()
        };
        assert!(matches!(
            s.apply(Command::UpdateBackend {
                id: id("web-2"),
                update: retag.clone(),
                force: false
            }),
            Err(CommandError::BackendInUse { .. })
        ));
        assert!(s
            .apply(Command::UpdateBackend {
                id: id("web-2"),
                update: retag,
                force: true
            })
            .is_ok());
        // web-1 shares "a" with web-2: deleting it orphans nobody.
        assert!(s
            .apply(Command::DeleteBackend {
                id: id("web-1"),
                force: false
            })
            .is_ok());
        let (_, change) = s
            .apply(Command::DeleteBackend {
                id: id("web-2"),
                force: true,
            })
            .unwrap();
        assert!(matches!(change, Change::BackendDeleted(_)));
    }
}
