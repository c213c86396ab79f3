//! Cluster mode end to end, over NATS and over Redis: a real `nats-server` or `redis-server`
//! process on a free loopback port and three real wsgate nodes (`--workers 2`), real sockets.
//! Every scenario runs against both brokers (`nats::NAME` and `redis::NAME`), except the
//! NATS-only ones (a three-server NATS cluster, permissions on `PREFIX.>`). Every wait is
//! bounded and polls for its condition; nothing asserts on a fixed sleep.
//!
//! `nats-server` and `redis-server` must be installed (Debian packages of those names;
//! `scripts/test-cluster.sh` installs them). When one cannot be started these tests fail,
//! never skip.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, wait_for, Client, Gateway, T};
use serde_json::{json, Value};

/// Which broker a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Nats,
    Redis,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Redis => "redis",
        }
    }
}

/// Every scenario below, as one `#[test]` per broker.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod nats {
            $(#[test] fn $name() { super::$name(super::Kind::Nats) })*
        }
        mod redis {
            $(#[test] fn $name() { super::$name(super::Kind::Redis) })*
        }
    };
}

on_both_brokers!(
    send_publish_broadcast_presence_disconnect_sum_over_nodes,
    routable_at_welcome_and_member_at_join_ack_across_nodes,
    order_per_sender_across_nodes_and_the_cost_of_an_ack,
    many_counted_requests_in_flight_are_each_counted_exactly,
    ids_with_special_characters_are_safe,
    two_prefixes_on_one_broker_are_separate_clusters,
    a_killed_node_is_left_out_within_3s,
    a_frozen_node_is_left_out_then_resumes,
    a_new_node_is_reached_and_counted_within_5s,
    a_node_shutting_down_says_goodbye,
    broker_restart_delivery_resumes_without_reconnecting_clients,
    a_frozen_broker_is_noticed_and_local_service_goes_on,
    a_node_starts_without_its_broker,
);

/// A `nats-server` or `redis-server` process on a loopback port; killed when dropped.
struct Broker {
    kind: Kind,
    child: Option<Child>,
    port: u16,
    /// More flags (servers of a NATS cluster, a config file).
    cluster: Vec<String>,
    /// Where the server's log goes (`None`: nowhere).
    log: Option<std::path::PathBuf>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    fn start(kind: Kind) -> Broker {
        let mut b = Broker {
            kind,
            child: None,
            port: free_port(),
            cluster: Vec::new(),
            log: None,
        };
        b.spawn();
        b
    }

    /// A server where user `u` (password `p`) may publish and subscribe on `PREFIX.>` only;
    /// its log (permission violations included) goes to a file.
    fn with_permissions(prefix: &str) -> Broker {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-nats-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "authorization {{ users = [ {{ user: u, password: p, permissions: {{ \
                 publish: [\"{prefix}.>\"], subscribe: [\"{prefix}.>\"] }} }} ] }}\n"
            ),
        )
        .unwrap();
        let mut b = Broker {
            kind: Kind::Nats,
            child: None,
            port: free_port(),
            cluster: vec!["-c".into(), conf.to_string_lossy().into()],
            log: Some(dir.join("nats.log")),
        };
        b.spawn();
        b
    }

    /// The server's log so far.
    fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }

    /// Three servers of one NATS cluster (routes between them).
    fn cluster3() -> Vec<Broker> {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let all: Vec<String> = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        (0..3)
            .map(|i| {
                let mut b = Broker {
                    kind: Kind::Nats,
                    child: None,
                    port: free_port(),
                    log: None,
                    cluster: vec![
                        "--cluster_name".into(),
                        "c".into(),
                        "--cluster".into(),
                        all[i].clone(),
                        "--routes".into(),
                        all.iter()
                            .enumerate()
                            .filter(|(j, _)| *j != i)
                            .map(|(_, u)| u.clone())
                            .collect::<Vec<_>>()
                            .join(","),
                    ],
                };
                b.spawn();
                b
            })
            .collect()
    }

    fn spawn(&mut self) {
        let (var, default, args) = match self.kind {
            Kind::Nats => (
                "WSGATE_NATS_SERVER",
                "nats-server",
                vec!["-a", "127.0.0.1", "-p"],
            ),
            Kind::Redis => (
                "WSGATE_REDIS_SERVER",
                "redis-server",
                vec![
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--port",
                ],
            ),
        };
        let bin = std::env::var(var).unwrap_or_else(|_| default.into());
        let child = Command::new(&bin)
            .args(args)
            .arg(self.port.to_string())
            .args(&self.cluster)
            .stdout(Stdio::null())
            .stderr(match &self.log {
                Some(l) => Stdio::from(std::fs::File::create(l).unwrap()),
                None => Stdio::null(),
            })
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install it with scripts/test-cluster.sh or apt-get install -y {default}")
            });
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_for("the broker to accept", Duration::from_secs(10), &mut || {
            TcpStream::connect(addr).is_ok()
        });
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.kind.name(), self.port)
    }

    /// `kill -9`, and waits for the process to be gone.
    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.log.as_ref().and_then(|l| l.parent()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts a node of the cluster on `broker`.
fn node(broker: &Broker, id: &str, prefix: &str) -> Gateway {
    Gateway::start(&[
        "--cluster",
        &broker.url(),
        "--node-id",
        id,
        "--cluster-prefix",
        prefix,
    ])
}

fn three(broker: &Broker, prefix: &str) -> Vec<Gateway> {
    let nodes: Vec<Gateway> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| node(broker, id, prefix))
        .collect();
    wait_cluster(&nodes, 3);
    nodes
}

/// Waits until every node is connected and sees `n` live nodes.
fn wait_cluster(nodes: &[Gateway], n: usize) {
    for g in nodes {
        g.wait_stats(
            &format!("connected and {n} nodes"),
            Duration::from_secs(10),
            |s| {
                s["cluster"]["connected"] == true
                    && s["cluster"]["nodes"].as_array().map(|a| a.len()) == Some(n)
            },
        );
    }
}

fn post(g: &Gateway, path: &str, body: Value) -> Value {
    let (status, b) = http(g.addr, "POST", path, Some(&body.to_string()), &[]);
    assert_eq!(status, 200, "{path}: {b}");
    serde_json::from_str(&b).unwrap()
}

fn api_send(g: &Gateway, to: &str, data: Value) -> u64 {
    post(g, "/api/send", json!({"to": to, "data": data}))["delivered"]
        .as_u64()
        .unwrap()
}

fn presence(g: &Gateway, user: &str) -> u64 {
    let (status, b) = http(g.addr, "GET", &format!("/api/presence/{user}"), None, &[]);
    assert_eq!(status, 200, "{b}");
    serde_json::from_str::<Value>(&b).unwrap()["connections"]
        .as_u64()
        .unwrap()
}

/// Sends `marker` from `from`'s API to `user` until one is delivered (within `within`), then
/// reads `client` (a connection of `user`) up to it: what was in flight during a fault may or
/// may not arrive (at most once). Returns how long delivery took to come back.
fn delivery_resumes(
    what: &str,
    from: &Gateway,
    user: &str,
    client: &mut Client,
    marker: &str,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    wait_for(what, within, &mut || {
        api_send(from, user, json!(marker)) == 1
    });
    let took = start.elapsed();
    eprintln!("{what}: {took:?}");
    while recv_msg(client)["data"] != marker {}
    took
}

fn recv_msg(c: &mut Client) -> Value {
    c.recv_message(T)
        .unwrap_or_else(|e| panic!("no message: {e}"))
}

fn join(c: &mut Client, room: &str, id: u64) {
    let v = c
        .request(json!({"type": "join", "room": room}), id.into(), T)
        .unwrap();
    assert_eq!(v["type"], "ack", "{v}");
}

fn publish_acked(c: &mut Client, room: &str, data: Value, id: u64) -> u64 {
    let v = c
        .request(
            json!({"type": "publish", "room": room, "data": data}),
            id.into(),
            T,
        )
        .unwrap();
    v["delivered"].as_u64().unwrap_or_else(|| panic!("{v}"))
}

fn send_publish_broadcast_presence_disconnect_sum_over_nodes(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let mut a1 = n[0].connect("alice");
    let mut a2 = n[1].connect("alice");
    let mut bob = n[2].connect("bob");

    // A client's send, acked with the sum over nodes; the message keeps its shape.
    assert_eq!(
        common::send_acked(
            &mut bob,
            "alice",
            json!({"big": 18446744073709551615u64}),
            1
        ),
        2
    );
    for c in [&mut a1, &mut a2] {
        let m = recv_msg(c);
        assert_eq!(m["from"], "bob");
        assert!(m.get("room").is_none(), "{m}");
        assert_eq!(m["data"]["big"].to_string(), "18446744073709551615");
    }
    // From the API of any node; no `from`.
    for g in &n {
        assert_eq!(api_send(g, "alice", json!("api")), 2);
        for c in [&mut a1, &mut a2] {
            let m = recv_msg(c);
            assert!(m.get("from").is_none(), "{m}");
            assert_eq!(m["data"], "api");
        }
    }
    assert_eq!(api_send(&n[0], "nobody", json!(1)), 0);

    // Rooms: one member on each node.
    join(&mut a1, "lobby", 10);
    join(&mut a2, "lobby", 11);
    join(&mut bob, "lobby", 12);
    assert_eq!(publish_acked(&mut bob, "lobby", json!("hi"), 13), 3);
    for c in [&mut a1, &mut a2, &mut bob] {
        let m = recv_msg(c);
        assert_eq!(
            (m["room"].as_str(), m["from"].as_str()),
            (Some("lobby"), Some("bob"))
        );
    }
    let v = post(&n[1], "/api/publish", json!({"room": "lobby", "data": 2}));
    assert_eq!(v["delivered"], 3);
    for c in [&mut a1, &mut a2, &mut bob] {
        assert_eq!(recv_msg(c)["data"], 2);
    }
    // A leave on one node: the others' publishes no longer count it.
    let v = a2
        .request(json!({"type": "leave", "room": "lobby"}), 14.into(), T)
        .unwrap();
    assert_eq!(v["type"], "ack");
    assert_eq!(publish_acked(&mut bob, "lobby", json!(3), 15), 2);
    assert_eq!(recv_msg(&mut a1)["data"], 3);
    assert_eq!(recv_msg(&mut bob)["data"], 3);

    // Broadcast: every connection of every node.
    let v = post(&n[2], "/api/broadcast", json!({"data": "all"}));
    assert_eq!(v["delivered"], 3);
    for c in [&mut a1, &mut a2, &mut bob] {
        assert_eq!(recv_msg(c)["data"], "all");
    }

    // Presence and disconnect act on every node.
    for g in &n {
        assert_eq!(presence(g, "alice"), 2);
        assert_eq!(presence(g, "bob"), 1);
    }
    let v = post(&n[2], "/api/disconnect", json!({"user": "alice"}));
    assert_eq!(v["closed"], 2);
    common::expect_close(&mut a1, 1008, T);
    common::expect_close(&mut a2, 1008, T);
    for g in &n {
        g.wait_presence("alice", 0, Duration::from_secs(5));
    }
    assert_eq!(api_send(&n[0], "alice", json!(1)), 0);

    // What an operator sees.
    let s = n[0].stats();
    assert_eq!(s["cluster"]["node"], "n1");
    assert_eq!(s["cluster"]["broker"], kind.name());
    assert_eq!(s["cluster"]["nodes"], json!(["n1", "n2", "n3"]));
    let (status, body) = http(n[0].addr, "GET", "/readyz", None, &[]);
    assert_eq!((status, body.as_str()), (200, "ready"));
    assert_eq!(n[0].metric("wsgate_cluster_connected", ""), 1.0);
    assert_eq!(n[0].metric("wsgate_cluster_nodes", ""), 3.0);
    assert!(n[0].metric("wsgate_cluster_messages_to_broker_total", "") > 0.0);
    assert!(n[0].metric("wsgate_cluster_messages_from_broker_total", "") > 0.0);
    assert_eq!(n[0].metric("wsgate_cluster_missing_answers_total", ""), 0.0);
}

fn routable_at_welcome_and_member_at_join_ack_across_nodes(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let mut sender = n[0].connect("sender");
    for i in 0..100u64 {
        let user = format!("w{i}");
        let mut c = n[1 + (i as usize % 2)].connect(&user);
        // Right after the welcome, from another node.
        let d = common::send_acked(&mut sender, &user, json!(i), 1000 + i);
        assert_eq!(d, 1, "round {i}: the new connection was not counted");
        assert_eq!(recv_msg(&mut c)["data"], i, "round {i}");
        // Likewise a join: acked only once another node's publish reaches the member.
        let room = format!("room{i}");
        join(&mut c, &room, 1);
        let v = post(&n[0], "/api/publish", json!({"room": room, "data": i}));
        assert_eq!(v["delivered"], 1, "round {i}");
        assert_eq!(recv_msg(&mut c)["data"], i);
        c.close();
    }
}

fn order_per_sender_across_nodes_and_the_cost_of_an_ack(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let mut sender = n[0].connect("s");
    let mut r1 = n[1].connect("r");
    let mut r2 = n[2].connect("r");
    join(&mut r1, "ordered", 1);
    join(&mut r2, "ordered", 2);
    const N: u64 = 500;
    for i in 0..N {
        sender.send_to("r", json!(i), None).unwrap();
        sender
            .send_json(&json!({"type": "publish", "room": "ordered", "data": i}))
            .unwrap();
    }
    for c in [&mut r1, &mut r2] {
        let (mut direct, mut room) = (0, 0);
        while direct < N || room < N {
            let m = recv_msg(c);
            if m.get("room").is_some() {
                assert_eq!(m["data"], room, "room order");
                room += 1;
            } else {
                assert_eq!(m["data"], direct, "direct order");
                direct += 1;
            }
        }
    }

    // The cost of a counted send: same node vs another node (one broker round trip).
    let local = n[0].connect("local");
    let time = |c: &mut Client, to: &str, base: u64| {
        let start = Instant::now();
        for i in 0..200 {
            assert!(common::send_acked(c, to, json!(i), base + i) >= 1);
        }
        start.elapsed() / 200
    };
    let same = time(&mut sender, "local", 10_000);
    let cross = time(&mut sender, "r", 20_000);
    let single = Gateway::start(&[]);
    let mut c = single.connect("x");
    let alone = time(&mut c, "x", 30_000);
    eprintln!(
        "acked send, mean of 200: without --cluster {alone:?}; in a 3-node cluster, recipient \
         on the same node {same:?}, on another node {cross:?}"
    );
    local.close();
}

/// Hundreds of acked sends and publishes in flight at once, to targets held by one, two or
/// no other node: the node batches their probes and answers (NATS), and every ack must still
/// carry its exact count, none given up on at the timeout.
fn many_counted_requests_in_flight_are_each_counted_exactly(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let mut sender = n[0].connect("s");
    // (user, node) pairs: "a" on nodes 0 and 1, "b" on 1 and 2, "c" on 2 only.
    let mut held: Vec<Client> = [("a", 0), ("a", 1), ("b", 1), ("b", 2), ("c", 2)]
        .iter()
        .map(|(u, i)| n[*i].connect(u))
        .collect();
    for (i, c) in held.iter_mut().enumerate() {
        join(c, &format!("room-{}", i % 2), 100 + i as u64);
    }
    let expected = |i: u64| -> u64 {
        match i % 6 {
            0 | 1 => 2, // send to "a", "b"
            2 => 1,     // send to "c"
            3 => 0,     // send to nobody
            4 => 3,     // publish to room-0: a@0, b@1, c@2
            _ => 2,     // publish to room-1: a@1, b@2
        }
    };
    const N: u64 = 600;
    for i in 0..N {
        let v = match i % 6 {
            0 => json!({"type": "send", "to": "a", "data": i, "id": i}),
            1 => json!({"type": "send", "to": "b", "data": i, "id": i}),
            2 => json!({"type": "send", "to": "c", "data": i, "id": i}),
            3 => json!({"type": "send", "to": "nobody", "data": i, "id": i}),
            4 => json!({"type": "publish", "room": "room-0", "data": i, "id": i}),
            _ => json!({"type": "publish", "room": "room-1", "data": i, "id": i}),
        };
        sender.send_json(&v).unwrap();
    }
    let start = Instant::now();
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let v = sender.recv(T).unwrap();
        assert_eq!(v["type"], "ack", "{v}");
        let id = v["id"].as_u64().unwrap();
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "two acks for {id}"
        );
        assert_eq!(v["delivered"], expected(id), "ack {v}");
    }
    // Each received exactly its share.
    let want = [N / 6 * 2, N / 6 * 2, N / 6 * 2, N / 6 * 2, N / 6 * 2];
    for (c, want) in held.iter_mut().zip(want) {
        for _ in 0..want {
            recv_msg(c);
        }
    }
    assert_eq!(n[0].metric("wsgate_cluster_missing_answers_total", ""), 0.0);
    eprintln!(
        "{N} counted requests in flight answered in {:?}",
        start.elapsed()
    );
}

fn ids_with_special_characters_are_safe(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let ids = ["a.b", "a", "b", "x:y@z", "x", "a-b_c", "a.b.c", "A.B"];
    let mut clients: Vec<Client> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| n[1 + i % 2].connect(id))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(api_send(&n[0], id, json!(id)), 1, "{id}");
        assert_eq!(recv_msg(&mut clients[i])["data"], *id);
        assert_eq!(presence(&n[0], id), 1, "{id}");
    }
    // Each got only its own message.
    for c in clients.iter_mut() {
        match c.recv(Duration::from_millis(300)) {
            Err(common::ClientError::Timeout) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Wildcards are not valid ids at all.
    for bad in ["*", ">", "a.*", "a.>"] {
        let (status, _) = http(
            n[0].addr,
            "POST",
            "/api/send",
            Some(&json!({"to": bad, "data": 1}).to_string()),
            &[],
        );
        assert_eq!(status, 400, "{bad}");
    }
    // Rooms too.
    join(&mut clients[0], "r.1", 1);
    join(&mut clients[1], "r", 2);
    let v = post(&n[0], "/api/publish", json!({"room": "r.1", "data": "dot"}));
    assert_eq!(v["delivered"], 1);
    assert_eq!(recv_msg(&mut clients[0])["data"], "dot");
}

fn two_prefixes_on_one_broker_are_separate_clusters(kind: Kind) {
    let broker = Broker::start(kind);
    let p1: Vec<Gateway> = ["n1", "n2"]
        .iter()
        .map(|id| node(&broker, id, "one"))
        .collect();
    let p2: Vec<Gateway> = ["n1", "n2"]
        .iter()
        .map(|id| node(&broker, id, "two.x"))
        .collect();
    wait_cluster(&p1, 2);
    wait_cluster(&p2, 2);
    let mut u1 = p1[1].connect("u");
    let mut u2 = p2[1].connect("u");
    assert_eq!(api_send(&p1[0], "u", json!("one")), 1);
    assert_eq!(recv_msg(&mut u1)["data"], "one");
    assert_eq!(api_send(&p2[0], "u", json!("two")), 1);
    assert_eq!(recv_msg(&mut u2)["data"], "two");
    assert_eq!(presence(&p1[0], "u"), 1);
    assert_eq!(
        post(&p2[0], "/api/broadcast", json!({"data": 0}))["delivered"],
        1
    );
    assert_eq!(recv_msg(&mut u2)["data"], 0);
    match u1.recv(Duration::from_millis(300)) {
        Err(common::ClientError::Timeout) => {}
        other => panic!("the other cluster's message leaked: {other:?}"),
    }
    // Each sees only its own two nodes.
    wait_cluster(&p1, 2);
}

fn a_killed_node_is_left_out_within_3s(kind: Kind) {
    let broker = Broker::start(kind);
    let mut n = three(&broker, "wsgate");
    let _k1 = n[0].connect("k");
    let _k3 = n[2].connect("k");
    assert_eq!(presence(&n[1], "k"), 2);
    n[2].signal(libc::SIGKILL);
    let killed = Instant::now();
    let _ = n[2].child.wait();
    // Counts leave the dead node out: the first answer waits at most --cluster-timeout.
    wait_for(
        "presence without the dead node",
        Duration::from_secs(3),
        &mut || presence(&n[1], "k") == 1,
    );
    let counted = killed.elapsed();
    assert_eq!(api_send(&n[1], "k", json!(1)), 1);
    n.truncate(2);
    wait_cluster(&n, 2);
    eprintln!(
        "killed node left out of counts after {counted:?}, of the live list after {:?}",
        killed.elapsed()
    );
    assert!(killed.elapsed() < Duration::from_secs(5));
    // Afterwards counts are immediate again (no node to wait for).
    let start = Instant::now();
    assert_eq!(presence(&n[1], "k"), 1);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

fn a_frozen_node_is_left_out_then_resumes(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let _f1 = n[0].connect("f");
    let mut f3 = n[2].connect("f");
    n[2].signal(libc::SIGSTOP);
    // Counts stop waiting for it after --cluster-timeout (2 s).
    let start = Instant::now();
    assert_eq!(api_send(&n[1], "f", json!("frozen")), 1);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(n[1].metric("wsgate_cluster_missing_answers_total", "") >= 1.0);
    n[2].signal(libc::SIGCONT);
    // Back without a restart: counted again, and its connection still served.
    let mut counted = 0;
    wait_for(
        "the thawed node counted again",
        Duration::from_secs(5),
        &mut || {
            counted = api_send(&n[1], "f", json!("thawed"));
            counted == 2
        },
    );
    loop {
        // What was published while it was frozen may or may not arrive (at most once).
        let m = recv_msg(&mut f3);
        if m["data"] == "thawed" {
            break;
        }
    }
    wait_cluster(&n, 3);
}

fn a_new_node_is_reached_and_counted_within_5s(kind: Kind) {
    let broker = Broker::start(kind);
    let n = vec![node(&broker, "n1", "wsgate"), node(&broker, "n2", "wsgate")];
    wait_cluster(&n, 2);
    let started = Instant::now();
    let late = node(&broker, "n3", "wsgate");
    let mut c = late.connect("late");
    wait_for("the new node counted", Duration::from_secs(5), &mut || {
        api_send(&n[0], "late", json!(1)) == 1
    });
    eprintln!(
        "a new node was counted {:?} after its start",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(recv_msg(&mut c)["data"], 1);
}

fn a_node_shutting_down_says_goodbye(kind: Kind) {
    let broker = Broker::start(kind);
    let mut n = three(&broker, "wsgate");
    let c = n[2].connect("bye");
    c.close();
    n[2].wait_presence("bye", 0, Duration::from_secs(5));
    // No connection left: the process exits at once, after its goodbye.
    n[2].signal(libc::SIGTERM);
    let _ = n[2].child.wait();
    n.truncate(2);
    let start = Instant::now();
    // Left out of the live list and of counts at once, not after the 3 s of silence.
    wait_cluster(&n, 2);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let start = Instant::now();
    assert_eq!(presence(&n[0], "bye"), 0);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

fn broker_restart_delivery_resumes_without_reconnecting_clients(kind: Kind) {
    let mut broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let mut far = n[1].connect("far");
    let mut near = n[0].connect("near");
    assert_eq!(api_send(&n[0], "far", json!("before")), 1);
    assert_eq!(recv_msg(&mut far)["data"], "before");

    broker.kill();
    // Local service goes on, and readiness says why the node is not fully ready.
    for g in &n {
        g.wait_for("readyz 503", Duration::from_secs(5), || {
            http(g.addr, "GET", "/readyz", None, &[]) == (503, "broker disconnected".into())
        });
    }
    assert_eq!(api_send(&n[0], "near", json!("local")), 1);
    assert_eq!(recv_msg(&mut near)["data"], "local");
    // A client connecting during the outage is welcomed (served locally) and becomes
    // reachable from the other nodes once the broker is back.
    let mut during = n[1].connect("during");
    let s = n[0].stats();
    assert_eq!(s["cluster"]["connected"], false);
    assert_eq!(n[0].metric("wsgate_cluster_connected", ""), 0.0);

    broker.spawn();
    let back = Instant::now();
    let mut delivered = 0;
    wait_for(
        "cross-node delivery after the broker's restart",
        Duration::from_secs(5),
        &mut || {
            delivered += api_send(&n[0], "far", json!("after"));
            delivered > 0
        },
    );
    eprintln!(
        "cross-node delivery resumed {:?} after the broker came back",
        back.elapsed()
    );
    assert_eq!(recv_msg(&mut far)["data"], "after");
    wait_for(
        "the client that came during the outage, reached",
        Duration::from_secs(5),
        &mut || api_send(&n[0], "during", json!("hello")) == 1,
    );
    assert!(back.elapsed() < Duration::from_secs(5));
    loop {
        if recv_msg(&mut during)["data"] == "hello" {
            break;
        }
    }
    wait_cluster(&n, 3);
    assert!(n[0].metric("wsgate_cluster_reconnects_total", "") >= 1.0);
    let (status, _) = http(n[0].addr, "GET", "/readyz", None, &[]);
    assert_eq!(status, 200);
    // Exact again: both sides of the same user, counted.
    let _far2 = n[2].connect("far");
    assert_eq!(api_send(&n[0], "far", json!("x")), 2);
}

/// A broker that stops answering while its connections stay open, as a network cut looks
/// to the nodes (no FIN, no RST): each node notices within seconds, says so on `/readyz` and
/// in its metrics, keeps serving and counting its own connections the whole time, even with
/// clients sending to other nodes, and is back by itself once the broker answers again.
fn a_frozen_broker_is_noticed_and_local_service_goes_on(kind: Kind) {
    let broker = Broker::start(kind);
    let n = three(&broker, "wsgate");
    let mut far = n[1].connect("far");
    let mut near = n[0].connect("near");
    let mut busy = n[0].connect("busy");
    assert_eq!(api_send(&n[0], "far", json!("before")), 1);
    assert_eq!(recv_msg(&mut far)["data"], "before");

    broker.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    // Cross-node traffic keeps coming while the broker is frozen: it must not stall the
    // node's own service.
    for i in 0..3000 {
        busy.send_to("far", json!(i), None).unwrap();
    }
    for g in &n {
        g.wait_for("readyz 503", Duration::from_secs(8), || {
            http(g.addr, "GET", "/readyz", None, &[]) == (503, "broker disconnected".into())
        });
    }
    eprintln!("a frozen broker noticed after {:?}", frozen.elapsed());
    assert_eq!(n[0].metric("wsgate_cluster_connected", ""), 0.0);
    for i in 0..20 {
        let start = Instant::now();
        assert_eq!(api_send(&n[0], "near", json!(i)), 1);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(recv_msg(&mut near)["data"], i);
    }
    assert_eq!(
        common::send_acked(&mut busy, "near", json!("from busy"), 1),
        1
    );
    assert_eq!(recv_msg(&mut near)["data"], "from busy");

    broker.signal(libc::SIGCONT);
    delivery_resumes(
        "cross-node delivery after the broker thawed",
        &n[0],
        "far",
        &mut far,
        "after",
        Duration::from_secs(8),
    );
    wait_cluster(&n, 3);
    for g in &n {
        g.wait_for("readyz 200", Duration::from_secs(5), || {
            http(g.addr, "GET", "/readyz", None, &[]).0 == 200
        });
    }
}

/// Failover between the servers of a NATS cluster: a node given one server learns the
/// others from it and moves to one of them when its server dies.
#[test]
fn nats_cluster_failover() {
    let mut servers = Broker::cluster3();
    let a = node(&servers[0], "a", "wsgate");
    let b = node(&servers[2], "b", "wsgate");
    let n = vec![a, b];
    // Heartbeats cross the route: the servers are joined.
    wait_cluster(&n, 2);
    let mut ub = n[1].connect("ub");
    // Interest travels between servers asynchronously: poll until it has.
    let mut got = 0;
    wait_for(
        "interest across servers",
        Duration::from_secs(5),
        &mut || {
            got = api_send(&n[0], "ub", json!("first"));
            got == 1
        },
    );
    assert_eq!(recv_msg(&mut ub)["data"], "first");

    servers[0].kill();
    delivery_resumes(
        "cross-node delivery after the failover",
        &n[0],
        "ub",
        &mut ub,
        "again",
        Duration::from_secs(5),
    );
    wait_cluster(&n, 2);
    assert!(n[0].metric("wsgate_cluster_reconnects_total", "") >= 1.0);
}

/// CLUSTER.md: every subject a node uses, reply inboxes included, starts with the prefix,
/// so `PREFIX.>` is all the broker permissions a cluster needs. Credentials in the URL.
#[test]
fn permissions_on_the_prefix_alone_are_enough() {
    let broker = Broker::with_permissions("perm");
    let url = format!("nats://u:p@127.0.0.1:{}", broker.port);
    let n: Vec<Gateway> = ["n1", "n2"]
        .iter()
        .map(|id| {
            Gateway::start(&[
                "--cluster",
                &url,
                "--node-id",
                id,
                "--cluster-prefix",
                "perm",
            ])
        })
        .collect();
    wait_cluster(&n, 2);
    let mut c = n[1].connect("p.u");
    let mut s = n[0].connect("s");
    assert_eq!(common::send_acked(&mut s, "p.u", json!(1), 1), 1);
    assert_eq!(recv_msg(&mut c)["data"], 1);
    join(&mut c, "room", 2);
    assert_eq!(publish_acked(&mut s, "room", json!(2), 3), 1);
    assert_eq!(
        post(&n[0], "/api/broadcast", json!({"data": 3}))["delivered"],
        2
    );
    assert_eq!(presence(&n[0], "p.u"), 1);
    assert_eq!(
        post(&n[0], "/api/disconnect", json!({"user": "p.u"}))["closed"],
        1
    );
    let log = broker.log();
    assert!(!log.contains("Violation"), "{log}");
    // The check is real: a node with another prefix is refused by the server.
    let other = Gateway::start(&[
        "--cluster",
        &url,
        "--node-id",
        "x",
        "--cluster-prefix",
        "other",
    ]);
    let _c = other.connect("y");
    wait_for(
        "a permissions violation logged",
        Duration::from_secs(5),
        &mut || broker.log().contains("Violation"),
    );
}

#[test]
fn flags_checked_and_single_node_unchanged() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "redis://127.0.0.1:6379,nats://127.0.0.1:4222",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("one redis:// URL"), "{err}");
    // Without --cluster: no cluster section, ready, no broker thread.
    let g = Gateway::start(&[]);
    assert!(g.stats().get("cluster").is_none());
    let (status, body) = http(g.addr, "GET", "/readyz", None, &[]);
    assert_eq!((status, body.as_str()), (200, "ready"));
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", g.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert!(
        !threads
            .iter()
            .any(|t| t.contains("cluster") || t.contains("tokio")),
        "{threads:?}"
    );
}

/// A node starts even when the broker is unreachable, says so, and joins once it is there.
fn a_node_starts_without_its_broker(kind: Kind) {
    let mut broker = Broker::start(kind);
    broker.kill();
    let g = node(&broker, "solo", "wsgate");
    let mut c = g.connect("solo");
    assert_eq!(common::send_acked(&mut c, "solo", json!(1), 1), 1);
    assert_eq!(recv_msg(&mut c)["data"], 1);
    let (status, body) = http(g.addr, "GET", "/readyz", None, &[]);
    assert_eq!((status, body.as_str()), (503, "broker disconnected"));
    assert_eq!(g.stats()["cluster"]["broker"], kind.name());
    broker.spawn();
    let other = node(&broker, "other", "wsgate");
    let n = [g, other];
    wait_cluster(&n, 2);
    assert_eq!(api_send(&n[1], "solo", json!(2)), 1);
    assert_eq!(recv_msg(&mut c)["data"], 2);
}

/// Redis: credentials in the URL (`redis://:password@host`).
#[test]
fn redis_password_in_the_url() {
    let mut broker = Broker {
        kind: Kind::Redis,
        child: None,
        port: free_port(),
        cluster: vec!["--requirepass".into(), "s3cret".into()],
        log: None,
    };
    broker.spawn();
    let url = format!("redis://:s3cret@127.0.0.1:{}", broker.port);
    let n: Vec<Gateway> = ["n1", "n2"]
        .iter()
        .map(|id| Gateway::start(&["--cluster", &url, "--node-id", id]))
        .collect();
    wait_cluster(&n, 2);
    let mut c = n[1].connect("u");
    assert_eq!(api_send(&n[0], "u", json!(1)), 1);
    assert_eq!(recv_msg(&mut c)["data"], 1);
    // Without the password: never connected.
    let bad = format!("redis://127.0.0.1:{}", broker.port);
    let g = Gateway::start(&["--cluster", &bad, "--node-id", "x"]);
    let _x = g.connect("x");
    let (status, body) = http(g.addr, "GET", "/readyz", None, &[]);
    assert_eq!((status, body.as_str()), (503, "broker disconnected"));
}

/// Starts `bin` (another build of wsgate, e.g. the release one) like `Gateway::start`.
fn start_bin(bin: &str, args: &[&str]) -> Gateway {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--workers", "2"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start wsgate");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let addr = line.strip_prefix("listening on ").unwrap().parse().unwrap();
    std::thread::spawn(move || for _ in lines {});
    Gateway { child, addr }
}

/// Not part of the suite; measures what a counted send costs in a cluster:
/// `WSGATE_MEASURE_BIN=target/release/wsgate cargo test --test cluster measure -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_the_cost_of_crossing_nodes() {
    let bin = std::env::var("WSGATE_MEASURE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsgate").to_string());
    let broker = Broker::start(Kind::Nats);
    let url = broker.url();
    let n: Vec<Gateway> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_bin(&bin, &["--cluster", &url, "--node-id", id]))
        .collect();
    wait_cluster(&n, 3);
    let single = start_bin(&bin, &[]);
    const ROUNDS: u64 = 2000;
    let mut sender = n[0].connect("s");
    let _near = n[0].connect("near");
    let _far = n[1].connect("far");
    let mut alone = single.connect("s");
    let _alone_near = single.connect("near");
    let time = |c: &mut Client, to: &str, base: u64| {
        let mut v: Vec<Duration> = (0..ROUNDS)
            .map(|i| {
                let t = Instant::now();
                assert_eq!(common::send_acked(c, to, json!(i), base + i), 1);
                t.elapsed()
            })
            .collect();
        v.sort();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    };
    let (a50, a99) = time(&mut alone, "near", 0);
    let (s50, s99) = time(&mut sender, "near", 100_000);
    let (f50, f99) = time(&mut sender, "far", 200_000);
    // Uncounted throughput across nodes: one sender, one recipient on another node.
    let mut far = n[2].connect("far2");
    let t = Instant::now();
    const BURST: u64 = 20_000;
    for i in 0..BURST {
        sender.send_to("far2", json!(i), None).unwrap();
    }
    for i in 0..BURST {
        assert_eq!(recv_msg(&mut far)["data"], i);
    }
    let rate = BURST as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "{bin}\nacked send, median / p99 of {ROUNDS}:\n  without --cluster:          {a50:?} / {a99:?}\n  \
         cluster, recipient here:    {s50:?} / {s99:?}\n  cluster, recipient remote:  {f50:?} / {f99:?}\n\
         uncounted sends to another node, one sender: {rate:.0} msg/s"
    );
}

fn rss_kib(g: &Gateway) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", g.child.id())).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Not part of the suite; what one connected user costs a node in memory, with and without
/// cluster mode (each user is a broker subscription in a cluster):
/// `WSGATE_MEASURE_BIN=target/release/wsgate cargo test --test cluster memory -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_memory_per_user() {
    let bin = std::env::var("WSGATE_MEASURE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsgate").to_string());
    const USERS: usize = 3000;
    let broker = Broker::start(Kind::Nats);
    let url = broker.url();
    let single = start_bin(&bin, &[]);
    let cluster = start_bin(&bin, &["--cluster", &url, "--node-id", "m"]);
    wait_cluster(std::slice::from_ref(&cluster), 1);
    for (name, g) in [("single node", &single), ("cluster node", &cluster)] {
        let before = rss_kib(g);
        let clients: Vec<Client> = (0..USERS).map(|i| g.connect(&format!("user{i}"))).collect();
        g.wait_connections(USERS as i64, Duration::from_secs(30));
        // The sweeper returns freed pages once a second.
        std::thread::sleep(Duration::from_secs(2));
        let after = rss_kib(g);
        eprintln!(
            "{name}: {USERS} users, one connection each: {} bytes per user",
            (after.saturating_sub(before)) * 1024 / USERS as u64
        );
        drop(clients);
    }
}
