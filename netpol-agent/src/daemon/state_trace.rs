//! `policy trace` / `policy matrix` online: the [`World`] of the running agent — the maps read
//! back from the kernel now (through the datapath module), the compiler's rule table and
//! selections of the last compile, and Docker's containers.

use netpol_common::identity as reserved;

use super::{labels_of, Agent, AgentError};
use crate::{
    identity::display_name,
    policy::{
        sources::labels::identity_labels,
        trace::{parse_target, Attach, Matrix, Member, PeerRef, World},
    },
    reconcile::ReconcileError,
};

impl Agent {
    /// What a trace reads. The entries are the kernel's, not the agent's idea of them.
    pub fn trace_world(&self) -> Result<World, AgentError> {
        let maps = self.dp.current().map_err(ReconcileError::Read)?;
        let mut w = World {
            maps,
            ..World::default()
        };
        if let Some(c) = &self.compiled {
            w.rules = c.rules.clone();
            w.selections = c.selections.clone();
            for (cidr, id) in &c.cidr_identities {
                w.identity_names.insert(*id, format!("cidr:{cidr}"));
            }
        }
        for (id, labels) in self.ids.iter() {
            w.identity_names.insert(id, display_name(id, Some(labels)));
        }
        for id in [reserved::HOST, reserved::WORLD, reserved::UNMANAGED] {
            w.identity_names.insert(id, display_name(id, None));
        }
        for c in self.containers.values().filter(|c| c.running) {
            let identity = self
                .ids
                .lookup(&identity_labels(&self.filter, &labels_of(c)))
                .unwrap_or(reserved::UNMANAGED);
            w.containers.push(Member {
                id: c.id.clone(),
                name: c.name.clone(),
                project: c.compose_project().map(str::to_owned),
                service: c.compose_service().map(str::to_owned),
                identity,
                attachments: c
                    .networks
                    .iter()
                    .map(|a| Attach {
                        network: a.network_name.clone(),
                        ifindex: a.host_veth,
                        ipv4: a.ipv4,
                        ipv6: a.ipv6,
                    })
                    .collect(),
            });
        }
        Ok(w)
    }

    /// `policy trace FROM TO[:PORT[/PROTO]]`: a [`crate::policy::trace::Trace`], or without a
    /// port the pair's [`crate::policy::trace::Cell`].
    pub fn trace(&self, from: &str, to: &str) -> Result<serde_json::Value, AgentError> {
        let (to, l4) = parse_target(to)?;
        let from = PeerRef::parse(from);
        let w = self.trace_world()?;
        let v = match l4 {
            Some(l4) => serde_json::to_value(w.trace(&from, &to, l4)?),
            None => serde_json::to_value(w.trace_all(&from, &to)?),
        };
        v.map_err(|e| AgentError::Invalid(e.to_string()))
    }

    /// `policy matrix [--project P]`.
    pub fn matrix(&self, project: Option<&str>) -> Result<Matrix, AgentError> {
        Ok(self.trace_world()?.matrix(project)?)
    }
}

#[cfg(test)]
mod tests {
    use netpol_common::proto::TCP;

    use super::super::tests::{agent, connects, db_accepts, service, snapshot, Dirs};
    use crate::{
        daemon::api::SourceFile,
        datapath::PolicyEntryKey,
        policy::trace::{L4Query, PeerRef, Trace},
    };

    #[test]
    fn trace_and_matrix_read_the_maps_as_they_are_now() {
        let dirs = Dirs::new("trace-maps");
        let mut a = agent(&dirs);
        let db = service(2, "db", &[]);
        let app1 = service(3, "app1", &[]);
        let app2 = service(4, "app2", &[]);
        snapshot(&mut a, &[&db, &app1, &app2]);
        a.import(&[SourceFile {
            path: "db.yaml".into(),
            text: db_accepts("app1", "TCP"),
        }])
        .expect("import");
        let trace = |a: &super::Agent, from: &str, to: &str| -> Trace {
            serde_json::from_value(a.trace(from, to).expect("trace")).expect("a trace")
        };
        let cs = [
            ("shop-db-1", &db),
            ("shop-app1-1", &app1),
            ("shop-app2-1", &app2),
        ];
        for (fname, from) in cs {
            for (tname, to) in cs {
                for port in [22, 5432, 5433] {
                    let t = trace(&a, fname, &format!("{tname}:{port}"));
                    assert_eq!(t.allowed(), connects(&a, from, to, port), "{}", t.render());
                }
            }
        }
        let t = trace(&a, "app1", "db:5432");
        assert_eq!(
            t.ingress.rule_name.as_deref(),
            Some("db ingress[0] (db.yaml)")
        );
        let m = a.matrix(Some("shop")).expect("matrix");
        assert_eq!(m.get("app1", "db").expect("cell").text, "5432/tcp");
        assert_eq!(m.get("app2", "db").expect("cell").text, "-");

        // The kernel's entries, not the compiler's: take the allow out of the maps.
        let w = a.trace_world().expect("world");
        let (k, _) = w
            .maps
            .policy
            .iter()
            .find(|(_, v)| v.is_allow())
            .map(|(k, v)| (*k, *v))
            .expect("an allow entry");
        let k: PolicyEntryKey = k;
        a.dp.delete_policy(k).expect("delete");
        let t = trace(&a, "app1", "db:5432");
        assert!(!t.allowed(), "{}", t.render());
        assert!(!connects(&a, &app1, &db, 5432));
        let w = a.trace_world().expect("world");
        let via_addr = w
            .trace(
                &PeerRef::parse("172.20.0.3"),
                &PeerRef::parse("172.20.0.2"),
                L4Query::Port {
                    proto: TCP,
                    port: 5432,
                },
            )
            .expect("trace by address");
        assert_eq!(
            (via_addr.from.as_str(), via_addr.to.as_str()),
            ("shop/app1", "shop/db")
        );
        assert!(!via_addr.allowed());
    }
}
