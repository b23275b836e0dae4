//! One ESP tunnel between two data planes, with make-before-break rekeying.
//!
//! The tool plays both IKE peers: gateway A's data plane is driven by one [`Client`], gateway
//! B's by another. Each direction of traffic has an SA pair with the same SPI and keys: A's
//! outbound SA and B's inbound SA (A → B), and B's outbound SA and A's inbound SA (B → A).
//! Each side also has one outbound protect policy (A's net → B's net on A, the reverse on B)
//! with [`TunnelConfig::policy_id`].
//!
//! [`Tunnel::rekey`], in this order:
//!
//! 1. new inbound SAs on both sides; wait until both are applied, so each new inbound SA is
//!    live before the peer can send with it;
//! 2. on each side the new outbound SA, then the protect policy replaced (same id, newer
//!    generation, protect with the new SA's name): the data plane swaps its SPD whole, so the
//!    switch is atomic; wait until applied;
//! 3. the old outbound SAs deleted;
//! 4. the old inbound SAs deleted after [`TunnelConfig::drain`] (packets still in flight),
//!    by [`Tunnel::poll`] once the delay has passed, or at once by [`Tunnel::finish_drain`]
//!    (also called by the next rekey).
//!
//! If a side fails in step 2 it keeps its old outbound SA (its new one is deleted again), and
//! the peer keeps the inbound SA that matches: on each side, the inbound SAs drained are
//! those the peer no longer sends with.
//!
//! SA names are `<tunnel>-<a|b>-<in|out>-<n>` (at most 32 bytes: the tunnel name has at most
//! 12); SPIs are random, ≥ 256, and never one that either data plane still has installed.

use crate::client::{Client, ClientError, Ticket};
use crate::json;
use crate::keys::{KeyMaterial, Random, RandomError, SpiError};
use espgw_ring::{
    DfMode, Direction, DscpMode, EcnMode, EncAlg, IntegAlg, IpPrefix, Lifetimes, Mode,
    PolicyAction, PolicySpec, PortRange, SaSpec, Selector, UdpEncap,
};
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Longest tunnel name (so every SA name fits the ring's 32 bytes).
pub const MAX_TUNNEL_NAME: usize = 12;

/// One gateway of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Its outer (public) address.
    pub addr: IpAddr,
    /// The subnet it protects.
    pub net: IpPrefix,
}

/// Which gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Gateway A.
    A,
    /// Gateway B.
    B,
}

impl Side {
    fn letter(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }

    fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// What a tunnel is.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Name, 1 … [`MAX_TUNNEL_NAME`] bytes; part of every SA's name.
    pub name: String,
    /// Gateway A.
    pub a: Endpoint,
    /// Gateway B.
    pub b: Endpoint,
    /// Encryption algorithm (default aes128gcm16).
    pub enc_alg: EncAlg,
    /// Integrity algorithm (`None` with AES-GCM; required otherwise).
    pub integ_alg: IntegAlg,
    /// ESP-in-UDP, seen from A: `local_port` is A's port, `remote_port` B's.
    pub encap: Option<UdpEncap>,
    /// Lifetimes of every SA.
    pub lifetime: Lifetimes,
    /// Anti-replay window of the inbound SAs.
    pub replay_window: u32,
    /// Extended sequence numbers.
    pub esn: bool,
    /// Id of the protect policy on each side.
    pub policy_id: u32,
    /// Its priority.
    pub priority: u32,
    /// How long an old inbound SA stays after a rekey (default 500 ms).
    pub drain: Duration,
    /// `reqid` of the SAs.
    pub reqid: u32,
}

impl TunnelConfig {
    /// A tunnel with the defaults: aes128gcm16, no encapsulation, no lifetimes, replay window
    /// 128, policy id 1, priority 100, drain 500 ms.
    pub fn new(name: impl Into<String>, a: Endpoint, b: Endpoint) -> TunnelConfig {
        TunnelConfig {
            name: name.into(),
            a,
            b,
            enc_alg: EncAlg::Aes128Gcm16,
            integ_alg: IntegAlg::None,
            encap: None,
            lifetime: Lifetimes::default(),
            replay_window: 128,
            esn: false,
            policy_id: 1,
            priority: 100,
            drain: Duration::from_millis(500),
            reqid: 1,
        }
    }

    fn endpoint(&self, side: Side) -> &Endpoint {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > MAX_TUNNEL_NAME {
            return Err(format!(
                "tunnel name {:?}: 1 to {MAX_TUNNEL_NAME} bytes",
                self.name
            ));
        }
        let fam = |a: IpAddr| a.is_ipv4();
        if fam(self.a.addr) != fam(self.b.addr) {
            return Err("the gateways' addresses are of different families".into());
        }
        if fam(self.a.net.addr) != fam(self.b.net.addr) {
            return Err("the protected subnets are of different families".into());
        }
        for (who, e) in [("a", &self.a), ("b", &self.b)] {
            let width = if e.net.addr.is_ipv4() { 32 } else { 128 };
            if e.net.len > width {
                return Err(format!(
                    "{who}'s subnet {}/{}: the prefix length exceeds {width}",
                    e.net.addr, e.net.len
                ));
            }
        }
        if self.enc_alg.is_aead() != (self.integ_alg == IntegAlg::None) {
            return Err(if self.enc_alg.is_aead() {
                format!("{} takes no integrity algorithm", self.enc_alg)
            } else {
                format!("{} needs an integrity algorithm", self.enc_alg)
            });
        }
        if let Some(e) = self.encap
            && (e.local_port == 0 || e.remote_port == 0)
        {
            return Err("UDP encapsulation with port 0".into());
        }
        Ok(())
    }
}

/// Why a tunnel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The configuration is unusable.
    #[error("tunnel configuration: {0}")]
    Config(String),
    /// No random numbers or no free SPI.
    #[error("tunnel {tunnel}: {source}")]
    Spi {
        /// The tunnel.
        tunnel: String,
        /// Why.
        source: SpiError,
    },
    /// A step failed on one side.
    #[error("tunnel {tunnel}, {operation}, {step} on side {side}: {source}")]
    Step {
        /// The tunnel.
        tunnel: String,
        /// "establish" or "rekey n".
        operation: String,
        /// Which step.
        step: &'static str,
        /// Where.
        side: Side,
        /// Why.
        source: Box<ClientError>,
    },
}

/// The names and SPIs of a tunnel's current SAs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelSpis {
    /// A's inbound SA (B → A).
    pub a_in: String,
    /// A's outbound SA (A → B).
    pub a_out: String,
    /// B's inbound SA (A → B).
    pub b_in: String,
    /// B's outbound SA (B → A).
    pub b_out: String,
    /// SPI of A → B (A's outbound, B's inbound), `0x…`.
    pub spi_ab: String,
    /// SPI of B → A (B's outbound, A's inbound), `0x…`.
    pub spi_ba: String,
}

/// What a rekey did (printed as one JSON line by the tool).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RekeyReport {
    /// The tunnel.
    pub tunnel: String,
    /// Rekey number (establish is 0).
    pub rekey: u64,
    /// Before.
    pub old: TunnelSpis,
    /// After (a side whose switch failed keeps its old outbound SA).
    pub new: TunnelSpis,
    /// Step 1, new inbound SAs on both sides, milliseconds.
    pub inbound_ms: f64,
    /// Step 2, outbound SA and policy on both sides.
    pub switch_ms: f64,
    /// Step 3, old outbound SAs deleted.
    pub delete_outbound_ms: f64,
    /// Old inbound SAs whose drain was cut short by this rekey (the previous rekey's).
    pub drained_early: usize,
    /// Old inbound SAs now draining, deleted after [`TunnelConfig::drain`].
    pub draining: Vec<String>,
}

#[derive(Debug, Clone)]
struct SaName {
    name: String,
    spi: u32,
}

#[derive(Debug, Default)]
struct SideState {
    /// Installed inbound SAs of this tunnel, oldest first.
    inbound: Vec<SaName>,
    /// The outbound SA the policy protects with.
    outbound: Option<SaName>,
}

/// A tunnel between the data planes of two [`Client`]s. The clients are passed to every call
/// (the daemon keeps one client per data plane and many tunnels); always pass A's first.
#[derive(Debug)]
pub struct Tunnel {
    cfg: TunnelConfig,
    rng: Random,
    rekeys: u64,
    a: SideState,
    b: SideState,
    /// Old inbound SAs waiting for their deletion: (side, name, when).
    draining: Vec<(Side, String, Instant)>,
}

/// Client of a side.
fn pick<'c>(side: Side, a: &'c mut Client, b: &'c mut Client) -> &'c mut Client {
    match side {
        Side::A => a,
        Side::B => b,
    }
}

impl Tunnel {
    /// A tunnel (nothing installed yet).
    pub fn new(cfg: TunnelConfig) -> Result<Tunnel, TunnelError> {
        cfg.check().map_err(TunnelError::Config)?;
        Ok(Tunnel {
            cfg,
            rng: Random::new(),
            rekeys: 0,
            a: SideState::default(),
            b: SideState::default(),
            draining: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TunnelConfig {
        &self.cfg
    }

    /// Rekeys done so far.
    pub fn rekeys(&self) -> u64 {
        self.rekeys
    }

    /// Names of the old inbound SAs waiting for deletion.
    pub fn draining(&self) -> Vec<(Side, String)> {
        self.draining
            .iter()
            .map(|(s, n, _)| (*s, n.clone()))
            .collect()
    }

    fn side(&self, s: Side) -> &SideState {
        match s {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn side_mut(&mut self, s: Side) -> &mut SideState {
        match s {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// The current SAs (empty names before [`Tunnel::establish`]).
    pub fn current(&self) -> TunnelSpis {
        let name = |x: Option<&SaName>| x.map(|s| s.name.clone()).unwrap_or_default();
        let spi = |x: Option<&SaName>| json::spi(x.map(|s| s.spi).unwrap_or(0));
        let a_out = self.a.outbound.as_ref();
        let b_out = self.b.outbound.as_ref();
        // The inbound SA each side's peer sends with.
        let a_in = self.current_inbound(Side::A);
        let b_in = self.current_inbound(Side::B);
        TunnelSpis {
            a_in: name(a_in),
            a_out: name(a_out),
            b_in: name(b_in),
            b_out: name(b_out),
            spi_ab: spi(a_out),
            spi_ba: spi(b_out),
        }
    }

    /// The inbound SA of `side` that the peer's current outbound SA feeds (else the newest).
    fn current_inbound(&self, side: Side) -> Option<&SaName> {
        let st = self.side(side);
        let peer_spi = self.side(side.peer()).outbound.as_ref().map(|s| s.spi);
        st.inbound
            .iter()
            .rev()
            .find(|s| Some(s.spi) == peer_spi)
            .or(st.inbound.last())
    }

    fn sa_name(&self, side: Side, dir: Direction, n: u64) -> String {
        let d = match dir {
            Direction::In => "in",
            Direction::Out => "out",
        };
        format!("{}-{}-{d}-{n}", self.cfg.name, side.letter())
    }

    /// The SA of `side` in `dir` (traffic from `side` to the peer for `Out`).
    fn spec(&self, side: Side, dir: Direction, spi: u32, name: String, k: &KeyMaterial) -> SaSpec {
        let c = &self.cfg;
        let me = c.endpoint(side);
        let peer = c.endpoint(side.peer());
        let (src, dst) = match dir {
            Direction::Out => (me.net, peer.net),
            Direction::In => (peer.net, me.net),
        };
        let encap = c.encap.map(|e| match side {
            Side::A => e,
            Side::B => UdpEncap {
                local_port: e.remote_port,
                remote_port: e.local_port,
            },
        });
        SaSpec {
            generation: 0, // the client assigns it
            spi,
            direction: dir,
            mode: Mode::Tunnel,
            reqid: c.reqid,
            name,
            local: me.addr,
            remote: peer.addr,
            encap,
            enc_alg: c.enc_alg,
            integ_alg: c.integ_alg,
            enc_key: k.enc_key.clone(),
            salt: k.salt.clone(),
            integ_key: k.integ_key.clone(),
            icv_len: c
                .enc_alg
                .aead_icv_len()
                .unwrap_or(c.integ_alg.icv_len())
                .try_into()
                .unwrap_or(0),
            esn: c.esn,
            initial_seq: 0,
            replay_window: c.replay_window,
            lifetime: c.lifetime,
            selectors: vec![selector(src, dst)],
            df: DfMode::Copy,
            dscp: DscpMode::Copy,
            ecn: EcnMode::Normal,
            outer_ttl: 64,
        }
    }

    fn policy(&self, side: Side, sa_name: &str) -> PolicySpec {
        let me = self.cfg.endpoint(side);
        let peer = self.cfg.endpoint(side.peer());
        PolicySpec {
            policy_id: self.cfg.policy_id,
            generation: 0, // the client assigns it
            direction: Direction::Out,
            priority: self.cfg.priority,
            selector: selector(me.net, peer.net),
            action: PolicyAction::Protect {
                sa_name: sa_name.to_string(),
            },
        }
    }

    /// Two fresh SPIs (A → B, B → A), distinct, not installed on either data plane.
    fn fresh_spis(&self, a: &Client, b: &Client) -> Result<(u32, u32), TunnelError> {
        let err = |source| TunnelError::Spi {
            tunnel: self.cfg.name.clone(),
            source,
        };
        let free = |spi: u32| a.spi_in_use(spi) || b.spi_in_use(spi);
        let ab = self.rng.spi(free).map_err(err)?;
        let ba = self.rng.spi(|spi| spi == ab || free(spi)).map_err(err)?;
        Ok((ab, ba))
    }

    fn keys(&self) -> Result<(KeyMaterial, KeyMaterial), TunnelError> {
        let err = |e: RandomError| TunnelError::Spi {
            tunnel: self.cfg.name.clone(),
            source: SpiError::Random(e),
        };
        let c = &self.cfg;
        Ok((
            self.rng.key_material(c.enc_alg, c.integ_alg).map_err(err)?,
            self.rng.key_material(c.enc_alg, c.integ_alg).map_err(err)?,
        ))
    }

    fn step_err(&self, op: &str, step: &'static str, side: Side, e: ClientError) -> TunnelError {
        TunnelError::Step {
            tunnel: self.cfg.name.clone(),
            operation: op.to_string(),
            step,
            side,
            source: Box::new(e),
        }
    }

    /// Installs the tunnel: the inbound SA on both sides (waiting for both), then on each side
    /// the outbound SA and the protect policy. On failure, what was installed is removed again
    /// (best effort).
    pub fn establish(&mut self, a: &mut Client, b: &mut Client) -> Result<TunnelSpis, TunnelError> {
        if self.a.outbound.is_some() || self.b.outbound.is_some() {
            return Err(TunnelError::Config(format!(
                "tunnel {} is already established",
                self.cfg.name
            )));
        }
        let (spi_ab, spi_ba) = self.fresh_spis(a, b)?;
        let (k_ab, k_ba) = self.keys()?;
        let n = self.rekeys;
        let op = "establish";
        self.add_inbound(a, b, n, (spi_ab, spi_ba), (&k_ab, &k_ba), op)?;
        let (_, _, first_err) = self.switch_outbound(a, b, n, (spi_ab, spi_ba), (&k_ab, &k_ba), op);
        if let Some(e) = first_err {
            // Undo: nothing carries traffic yet.
            let _ = self.teardown(a, b);
            return Err(e);
        }
        Ok(self.current())
    }

    /// Step 1: the inbound SAs of generation `n` on both sides, both waited for. On failure the
    /// one that was applied is deleted again.
    fn add_inbound(
        &mut self,
        a: &mut Client,
        b: &mut Client,
        n: u64,
        (spi_ab, spi_ba): (u32, u32),
        (k_ab, k_ba): (&KeyMaterial, &KeyMaterial),
        op: &str,
    ) -> Result<(), TunnelError> {
        let a_in = self.sa_name(Side::A, Direction::In, n);
        let b_in = self.sa_name(Side::B, Direction::In, n);
        let spec_a = self.spec(Side::A, Direction::In, spi_ba, a_in.clone(), k_ba);
        let spec_b = self.spec(Side::B, Direction::In, spi_ab, b_in.clone(), k_ab);
        let ta = a.submit_add_sa(spec_a).map(|(t, _)| t);
        let tb = b.submit_add_sa(spec_b).map(|(t, _)| t);
        let ra = ta.and_then(|t| a.wait(t));
        let rb = tb.and_then(|t| b.wait(t));
        match (ra, rb) {
            (Ok(_), Ok(_)) => {
                self.a.inbound.push(SaName {
                    name: a_in,
                    spi: spi_ba,
                });
                self.b.inbound.push(SaName {
                    name: b_in,
                    spi: spi_ab,
                });
                Ok(())
            }
            (Err(e), rb) => {
                if rb.is_ok() {
                    let _ = b.delete_sa_named(&b_in);
                }
                Err(self.step_err(op, "new inbound SAs", Side::A, e))
            }
            (Ok(_), Err(e)) => {
                let _ = a.delete_sa_named(&a_in);
                Err(self.step_err(op, "new inbound SAs", Side::B, e))
            }
        }
    }

    /// Step 2 on both sides: new outbound SA, then the policy pointing at it. Returns which
    /// sides switched and the first error. A side that failed keeps its old outbound SA.
    #[allow(clippy::type_complexity)]
    fn switch_outbound(
        &mut self,
        a: &mut Client,
        b: &mut Client,
        n: u64,
        (spi_ab, spi_ba): (u32, u32),
        (k_ab, k_ba): (&KeyMaterial, &KeyMaterial),
        op: &str,
    ) -> (bool, bool, Option<TunnelError>) {
        let a_out = self.sa_name(Side::A, Direction::Out, n);
        let b_out = self.sa_name(Side::B, Direction::Out, n);
        let sa_a = self.spec(Side::A, Direction::Out, spi_ab, a_out.clone(), k_ab);
        let sa_b = self.spec(Side::B, Direction::Out, spi_ba, b_out.clone(), k_ba);
        let pol_a = self.policy(Side::A, &a_out);
        let pol_b = self.policy(Side::B, &b_out);
        // Push both sides' records before waiting for either.
        let submit = |c: &mut Client,
                      sa: SaSpec,
                      pol: PolicySpec|
         -> Result<(Ticket, Ticket), ClientError> {
            let (t1, _) = c.submit_add_sa(sa)?;
            let t2 = match c.submit_add_policy(pol) {
                Ok((t, _)) => t,
                Err(e) => {
                    let _ = c.wait(t1);
                    return Err(e);
                }
            };
            Ok((t1, t2))
        };
        let sub_a = submit(a, sa_a, pol_a);
        let sub_b = submit(b, sa_b, pol_b);
        let finish = |c: &mut Client,
                      sub: Result<(Ticket, Ticket), ClientError>,
                      name: &str|
         -> Result<(), ClientError> {
            let (t1, t2) = sub?;
            let r1 = c.wait(t1);
            let r2 = c.wait(t2);
            match (r1, r2) {
                (Ok(_), Ok(_)) => Ok(()),
                (Ok(_), Err(e)) => {
                    // The policy still protects with the old SA: take the new one away.
                    let _ = c.delete_sa_named(name);
                    Err(e)
                }
                (Err(e), _) => Err(e),
            }
        };
        let ra = finish(a, sub_a, &a_out);
        let rb = finish(b, sub_b, &b_out);
        let mut first = None;
        let ok_a = ra.is_ok();
        let ok_b = rb.is_ok();
        if ok_a {
            self.a.outbound = Some(SaName {
                name: a_out,
                spi: spi_ab,
            });
        }
        if ok_b {
            self.b.outbound = Some(SaName {
                name: b_out,
                spi: spi_ba,
            });
        }
        if let Err(e) = ra {
            first = Some(self.step_err(op, "outbound SA and policy", Side::A, e));
        } else if let Err(e) = rb {
            first = Some(self.step_err(op, "outbound SA and policy", Side::B, e));
        }
        (ok_a, ok_b, first)
    }

    /// Make-before-break rekey with fresh SPIs and keys (see the module documentation).
    /// Finishes a previous rekey's drain first.
    pub fn rekey(&mut self, a: &mut Client, b: &mut Client) -> Result<RekeyReport, TunnelError> {
        let (Some(old_a_out), Some(old_b_out)) = (self.a.outbound.clone(), self.b.outbound.clone())
        else {
            return Err(TunnelError::Config(format!(
                "tunnel {} is not established",
                self.cfg.name
            )));
        };
        let drained_early = self.finish_drain(a, b)?;
        let old = self.current();
        let (spi_ab, spi_ba) = self.fresh_spis(a, b)?;
        let (k_ab, k_ba) = self.keys()?;
        let n = self.rekeys + 1;
        let op = format!("rekey {n}");

        let t0 = Instant::now();
        self.add_inbound(a, b, n, (spi_ab, spi_ba), (&k_ab, &k_ba), &op)?;
        self.rekeys = n;
        let t1 = Instant::now();
        let (ok_a, ok_b, err) =
            self.switch_outbound(a, b, n, (spi_ab, spi_ba), (&k_ab, &k_ba), &op);
        let t2 = Instant::now();
        // Step 3: the old outbound SAs of the sides that switched.
        let mut del_err = None;
        let mut tickets = Vec::new();
        for (side, ok, old) in [(Side::A, ok_a, &old_a_out), (Side::B, ok_b, &old_b_out)] {
            if ok {
                let c = pick(side, a, b);
                match c.submit_delete_sa_named(&old.name) {
                    Ok(t) => tickets.push((side, t)),
                    Err(e) => del_err = del_err.or(Some((side, e))),
                }
            }
        }
        for (side, t) in tickets {
            if let Err(e) = pick(side, a, b).wait(t) {
                del_err = del_err.or(Some((side, e)));
            }
        }
        let t3 = Instant::now();
        // Step 4: inbound SAs the peer no longer sends with.
        let deadline = t3 + self.cfg.drain;
        let mut draining = Vec::new();
        for side in [Side::A, Side::B] {
            let peer_spi = self.side(side.peer()).outbound.as_ref().map(|s| s.spi);
            let stale: Vec<String> = self
                .side(side)
                .inbound
                .iter()
                .filter(|s| Some(s.spi) != peer_spi)
                .map(|s| s.name.clone())
                .collect();
            for name in stale {
                if !self.draining.iter().any(|(_, n, _)| *n == name) {
                    draining.push(name.clone());
                    self.draining.push((side, name, deadline));
                }
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        if let Some((side, e)) = del_err {
            return Err(self.step_err(&op, "deleting the old outbound SA", side, e));
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(RekeyReport {
            tunnel: self.cfg.name.clone(),
            rekey: n,
            old,
            new: self.current(),
            inbound_ms: ms(t1 - t0),
            switch_ms: ms(t2 - t1),
            delete_outbound_ms: ms(t3 - t2),
            drained_early,
            draining,
        })
    }

    /// Deletes the old inbound SAs whose drain delay has passed by `now`; returns their names.
    pub fn poll(
        &mut self,
        a: &mut Client,
        b: &mut Client,
        now: Instant,
    ) -> Result<Vec<String>, TunnelError> {
        self.drain_where(a, b, |due| due <= now)
    }

    /// Deletes every old inbound SA still draining, now. Returns how many.
    pub fn finish_drain(&mut self, a: &mut Client, b: &mut Client) -> Result<usize, TunnelError> {
        self.drain_where(a, b, |_| true).map(|v| v.len())
    }

    fn drain_where(
        &mut self,
        a: &mut Client,
        b: &mut Client,
        due: impl Fn(Instant) -> bool,
    ) -> Result<Vec<String>, TunnelError> {
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.draining)
            .into_iter()
            .partition(|(_, _, t)| due(*t));
        self.draining = later;
        let mut done = Vec::new();
        let mut tickets = Vec::new();
        let mut first = None;
        for (side, name, t) in now {
            let c = pick(side, a, b);
            if c.sa(&name).is_none() {
                // Gone already (flushed, or never applied).
                self.forget_inbound(side, &name);
                done.push(name);
                continue;
            }
            match c.submit_delete_sa_named(&name) {
                Ok(ticket) => tickets.push((side, name, t, ticket)),
                Err(e) => {
                    first = first.or(Some((side, e)));
                    self.draining.push((side, name, t));
                }
            }
        }
        for (side, name, t, ticket) in tickets {
            match pick(side, a, b).wait(ticket) {
                Ok(_) => {
                    self.forget_inbound(side, &name);
                    done.push(name);
                }
                Err(e) => {
                    first = first.or(Some((side, e)));
                    self.draining.push((side, name, t));
                }
            }
        }
        if let Some((side, e)) = first {
            return Err(self.step_err("drain", "deleting an old inbound SA", side, e));
        }
        Ok(done)
    }

    fn forget_inbound(&mut self, side: Side, name: &str) {
        self.side_mut(side).inbound.retain(|s| s.name != name);
    }

    /// Removes the tunnel: the protect policies, then every SA of it on both sides. Keeps
    /// going after an error and returns the first.
    pub fn teardown(&mut self, a: &mut Client, b: &mut Client) -> Result<(), TunnelError> {
        let mut first = None;
        for side in [Side::A, Side::B] {
            let c = pick(side, a, b);
            let mut names: Vec<String> = Vec::new();
            let st = self.side(side);
            names.extend(st.inbound.iter().map(|s| s.name.clone()));
            names.extend(st.outbound.iter().map(|s| s.name.clone()));
            // The policy first (if it is ours), so no packet is protected with a deleted SA.
            let ours = c
                .policy(self.cfg.policy_id)
                .is_some_and(|p| match &p.action {
                    PolicyAction::Protect { sa_name } => names.contains(sa_name),
                    _ => false,
                });
            if ours && let Err(e) = c.delete_policy(self.cfg.policy_id) {
                first = first.or(Some((side, e)));
            }
            for name in names {
                if c.sa(&name).is_some()
                    && let Err(e) = c.delete_sa_named(&name)
                {
                    first = first.or(Some((side, e)));
                }
            }
            let st = self.side_mut(side);
            st.inbound.clear();
            st.outbound = None;
        }
        self.draining.clear();
        match first {
            Some((side, e)) => Err(self.step_err("teardown", "deleting", side, e)),
            None => Ok(()),
        }
    }
}

fn selector(src: IpPrefix, dst: IpPrefix) -> Selector {
    Selector {
        src,
        dst,
        protocol: 0,
        src_ports: PortRange::ANY,
        dst_ports: PortRange::ANY,
    }
}
