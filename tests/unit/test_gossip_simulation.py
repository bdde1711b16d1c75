"""Deterministic cluster simulations of the sans-I/O gossip core.

A ``Simulation`` runs N ``Gossiper`` instances in virtual time and routes their datagrams through a
simulated network that loses and delays (hence reorders) packets, all driven by one seeded
``random.Random``. Nothing sleeps; a run of hundreds of rounds takes a fraction of a second.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from pico.gossip import (
    GossipConfig,
    Gossiper,
    NodeExpired,
    NodeJoined,
    NodeLeft,
    NodeUnreachable,
    newer,
)

INTERVAL = 0.1


@dataclass
class Simulation:
    """Virtual-time cluster: ticks every node each interval, delivers datagrams after a delay."""

    seed: int
    loss: float = 0.0
    min_delay: float = 0.001
    max_delay: float = 0.001
    config: GossipConfig = field(default_factory=lambda: GossipConfig(interval=INTERVAL))
    now: float = 0.0
    nodes: dict[str, Gossiper] = field(default_factory=dict)
    alive: set[str] = field(default_factory=set)
    packets_sent: int = 0
    recorded: list[tuple[str, bytes, str]] = field(default_factory=list)  # (to, data, from)
    record: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        # (time, seq, kind, to, from, data); a tick's data is the life of the node it ticks.
        self._queue: list[tuple[float, int, str, str, str, bytes]] = []
        self._seq = 0
        self._lives: dict[str, int] = {}

    def add_node(self, node_id: str, incarnation: int | None = None) -> Gossiper:
        """Start a node; under an id used before, a new life of it (the old one is gone)."""
        gossiper = Gossiper(
            node_id,
            self.addr(node_id),
            self.config,
            rng=random.Random(self.rng.random()),
            incarnation=incarnation,
        )
        self.nodes[node_id] = gossiper
        self.alive.add(node_id)
        life = self._lives[node_id] = self._lives.get(node_id, 0) + 1
        at = self.now + self.rng.uniform(0, self.config.interval)
        self._push(at, "tick", node_id, "", str(life).encode())
        return gossiper

    @staticmethod
    def addr(node_id: str) -> str:
        return f"{node_id}:7946"

    def kill(self, node_id: str) -> None:
        """The process dies: it stops sending and receiving, without leaving."""
        self.alive.discard(node_id)

    def join(self, joiner: str, seed: str) -> None:
        """The TCP join exchange, delivered reliably and at once."""
        reply = self.nodes[seed].handle_join(self.nodes[joiner].join_request(self.now), self.now)
        assert self.nodes[joiner].handle_join_reply(reply, self.now) == seed

    def replay(self, packets: list[tuple[str, bytes, str]]) -> None:
        """Deliver old datagrams again (a stale duplicate network)."""
        for to, data, source in packets:
            at = self.now + self.rng.uniform(0, self.config.interval)
            self._push(at, "packet", to, source, data)

    def _push(self, at: float, kind: str, to: str, source: str, data: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, to, source, data))

    def _send(self, source: str, to: str, data: bytes) -> None:
        self.packets_sent += 1
        if self.record:
            self.recorded.append((to, data, source))
        if self.rng.random() < self.loss:
            return
        delay = self.rng.uniform(self.min_delay, self.max_delay)
        self._push(self.now + delay, "packet", to, source, data)

    def run_until(self, until: float) -> None:
        while self._queue and self._queue[0][0] <= until:
            at, _, kind, target, source, data = heapq.heappop(self._queue)
            self.now = at
            if kind == "tick":
                if target not in self.alive or int(data) != self._lives[target]:
                    continue  # dead, or a tick of an earlier life of this id
                gossiper = self.nodes[target]
                for out in gossiper.tick(at):
                    self._send(gossiper.addr, out.addr, out.data)
                self._push(at + gossiper.next_tick_delay(), "tick", target, "", data)
            else:
                node_id = target.rsplit(":", 1)[0]
                if node_id not in self.alive:
                    continue
                receiver = self.nodes[node_id]
                for out in receiver.receive_datagram(data, at, source):
                    self._send(receiver.addr, out.addr, out.data)
        self.now = until

    def run_rounds_until(self, condition: object, max_rounds: int) -> int:
        """Run round by round until ``condition()`` holds; returns the rounds it took."""
        assert callable(condition)
        for rounds in range(1, max_rounds + 1):
            self.run_until(self.now + self.config.interval)
            if condition():
                return rounds
        raise AssertionError(f"condition not met within {max_rounds} rounds")

    def live(self) -> list[Gossiper]:
        return [self.nodes[n] for n in sorted(self.alive)]

    def known_ids(self, gossiper: Gossiper) -> set[str]:
        return {m.id for m in gossiper.nodes()}


def endpoints_converged(sim: Simulation) -> bool:
    """Every live node holds every live node's ``endpoint:<id>`` with the right value."""
    for g in sim.live():
        for other in sim.alive:
            state = g.node_state(other)
            if state is None:
                return False
            values = {e.key: e.value for e in state.entries if not e.deleted}
            if values.get(f"endpoint:{other}") != "1":
                return False
    return True


def start_cluster(sim: Simulation, count: int, prefix: str = "node") -> list[str]:
    """Start ``count`` nodes that publish their addresses and each join the first one."""
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    for node_id in ids:
        g = sim.add_node(node_id)
        g.upsert("proxy_addr", f"{node_id}:8000")
        g.upsert("admin_addr", f"{node_id}:8002")
    for node_id in ids[1:]:
        sim.join(node_id, ids[0])
    return ids


def publish_endpoints(sim: Simulation) -> None:
    for g in sim.live():
        g.upsert(f"endpoint:{g.node_id}", "1")


# Measured with seeds 1-6: 50 nodes converge in 20-22 rounds with 10 % loss and up to 3 rounds of
# delay; the bound leaves room for other seeds.
CONVERGENCE_BOUND_ROUNDS = 40


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fifty_nodes_converge_on_endpoints_despite_loss_and_reordering(seed: int) -> None:
    sim = Simulation(seed, loss=0.10, min_delay=0.001, max_delay=3 * INTERVAL)
    start_cluster(sim, 50)
    sim.run_until(5 * INTERVAL)
    publish_endpoints(sim)
    rounds = sim.run_rounds_until(lambda: endpoints_converged(sim), CONVERGENCE_BOUND_ROUNDS)
    assert rounds <= CONVERGENCE_BOUND_ROUNDS


def test_restarted_process_under_a_new_id_is_a_new_node_and_the_old_id_expires() -> None:
    sim = Simulation(11, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 10)
    sim.run_rounds_until(lambda: all(len(g.nodes()) == 10 for g in sim.live()), 40)
    sim.kill(ids[3])
    restarted = sim.add_node(f"{ids[3]}-restarted")
    restarted.upsert("endpoint:restarted", "1")
    sim.join(restarted.node_id, ids[0])

    def new_seen_and_old_gone() -> bool:
        return all(
            restarted.node_id in sim.known_ids(g) and ids[3] not in sim.known_ids(g)
            for g in sim.live()
        )

    rounds = sim.run_rounds_until(new_seen_and_old_gone, 1200)
    assert rounds * INTERVAL <= DETECTION_BOUND + sim.config.expiry + 2
    for g in sim.live():
        state = g.node_state(restarted.node_id)
        assert state is not None and not state.unreachable and not state.left


# Measured: with 10 nodes, 10 % loss and reordering, every live node suspects a killed node 9-17 s
# after it died (a pair of nodes talks every ~0.5 s on average; phi 8 needs ~18 mean gaps).
DETECTION_BOUND = 30.0


def test_killed_nodes_become_unreachable_then_expire_and_never_come_back() -> None:
    sim = Simulation(7, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 10)
    publish_endpoints(sim)
    sim.run_rounds_until(lambda: endpoints_converged(sim), 40)
    victims = set(ids[-3:])
    sim.record = True  # capture gossip that still mentions the victims, to replay it later
    for victim in victims:
        sim.kill(victim)
    killed_at = sim.now

    def all_suspect() -> bool:
        return all(m.unreachable for g in sim.live() for m in g.nodes() if m.id in victims)

    detect_rounds = sim.run_rounds_until(all_suspect, int(DETECTION_BOUND / INTERVAL))
    assert detect_rounds * INTERVAL <= DETECTION_BOUND
    sim.record = False
    stale = [p for p in sim.recorded if p[0].rsplit(":", 1)[0] in sim.alive]
    assert stale

    def all_forgotten() -> bool:
        return all(not sim.known_ids(g) & victims for g in sim.live())

    sim.run_rounds_until(all_forgotten, int((sim.config.expiry + 5) / INTERVAL))
    assert sim.now - killed_at <= DETECTION_BOUND + sim.config.expiry + 2
    for g in sim.live():
        g.events()

    # Stale gossip keeps flowing (old datagrams replayed every few seconds) for 2 minutes: the
    # expired ids must never be re-added anywhere.
    for _ in range(40):
        sim.replay(sim.rng.sample(stale, 50))
        sim.run_until(sim.now + 3.0)
        for g in sim.live():
            assert not sim.known_ids(g) & victims
            assert not [e for e in g.events() if isinstance(e, NodeJoined) and e.id in victims]


def test_steady_cluster_with_loss_raises_no_false_suspicion() -> None:
    sim = Simulation(5, loss=0.10, max_delay=3 * INTERVAL)
    start_cluster(sim, 10)
    sim.run_until(60.0)
    suspected = [e for g in sim.live() for e in g.events() if isinstance(e, NodeUnreachable)]
    assert suspected == []


def test_leave_is_seen_as_left_by_everyone_quickly_then_expires() -> None:
    sim = Simulation(13, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 20)
    sim.run_rounds_until(lambda: all(len(g.nodes()) == 20 for g in sim.live()), 60)
    leaver = sim.nodes[ids[5]]
    notice = leaver.leave_request(sim.now)
    acks = 0
    for addr in leaver.leave_targets():
        peer = sim.nodes[addr.rsplit(":", 1)[0]]
        assert leaver.handle_leave_ack(peer.handle_leave(notice, sim.now)) == peer.node_id
        acks += 1
        if acks == 4:
            break
    sim.kill(leaver.node_id)

    def all_see_left() -> bool:
        return all((m := g.node_state(leaver.node_id)) is not None and m.left for g in sim.live())

    rounds = sim.run_rounds_until(all_see_left, 30)
    assert rounds <= 30  # measured: 6 rounds (0.6 s at a 100 ms interval)
    left_events = [e for g in sim.live() for e in g.events() if isinstance(e, NodeLeft)]
    assert {e.id for e in left_events} == {leaver.node_id}
    sim.run_rounds_until(
        lambda: all(leaver.node_id not in sim.known_ids(g) for g in sim.live()),
        int((sim.config.expiry + 5) / INTERVAL),
    )
    expired = [e for g in sim.live() for e in g.events() if isinstance(e, NodeExpired)]
    assert len(expired) == 19


def test_tcp_join_exchanges_full_state_both_ways() -> None:
    sim = Simulation(17, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 10)
    publish_endpoints(sim)
    sim.run_rounds_until(lambda: endpoints_converged(sim), 40)
    joiner = sim.add_node("newcomer")
    joiner.upsert("proxy_addr", "newcomer:8000")
    joiner.upsert("endpoint:newcomer", "1")
    seed = sim.nodes[ids[4]]
    seed.events()

    sim.join("newcomer", ids[4])

    # The joiner holds the seed's whole view at once, and the seed holds the joiner's state.
    assert sim.known_ids(joiner) == sim.known_ids(seed)
    for node_id in ids:
        assert joiner.node_state(node_id) == seed.node_state(node_id)
    joined = [e for e in seed.events() if isinstance(e, NodeJoined)]
    assert joined == [NodeJoined("newcomer", "newcomer:7946")]
    seen = seed.node_state("newcomer")
    assert seen is not None
    assert {e.key: e.value for e in seen.entries}["endpoint:newcomer"] == "1"
    # Everyone else learns about it by gossip.
    rounds = sim.run_rounds_until(lambda: endpoints_converged(sim), 40)
    assert rounds <= 40


def test_joining_yourself_succeeds_and_changes_nothing() -> None:
    g = Gossiper("solo", "solo:7946", GossipConfig(interval=INTERVAL))
    g.upsert("proxy_addr", "solo:8000")
    assert g.handle_join_reply(g.handle_join(g.join_request(0.0), 0.0), 0.0) == "solo"
    assert [m.id for m in g.nodes()] == ["solo"]
    assert g.events() == []


def restart(
    sim: Simulation, node_id: str, endpoint: str, incarnation: int | None = None
) -> Gossiper:
    """The process comes back under the same id, empty, publishing `endpoint`."""
    g = sim.add_node(node_id, incarnation)
    g.upsert("proxy_addr", f"{node_id}:8000")
    g.upsert("admin_addr", f"{node_id}:8002")
    g.upsert(endpoint, "1")
    return g


def holds(g: Gossiper, node_id: str) -> dict[str, str] | None:
    state = g.node_state(node_id)
    if state is None or state.left or state.unreachable:
        return None
    return {e.key: e.value for e in state.entries if not e.deleted and not e.internal}


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_a_node_restarted_under_the_same_id_replaces_its_old_life_everywhere(seed: int) -> None:
    sim = Simulation(seed, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 10)
    victim = ids[3]
    sim.nodes[victim].upsert("endpoint:old-life", "1")
    for n in range(40):  # an old life with many more versions than the new one will have
        sim.nodes[victim].upsert("endpoint:churn", str(n))
    sim.run_rounds_until(
        lambda: all((holds(g, victim) or {}).get("endpoint:churn") == "39" for g in sim.live()),
        40,
    )
    sim.kill(victim)
    sim.run_until(sim.now + 1.0)  # dead for a second: not yet suspected by everyone
    restart(sim, victim, "endpoint:new-life")
    sim.join(victim, ids[0])

    def new_life_everywhere() -> bool:
        return all(
            holds(g, victim)
            == {
                "proxy_addr": f"{victim}:8000",
                "admin_addr": f"{victim}:8002",
                "endpoint:new-life": "1",
            }
            for g in sim.live()
            if g.node_id != victim
        )

    rounds = sim.run_rounds_until(new_life_everywhere, 40)
    assert rounds <= 40  # measured: 2-4 rounds


def test_a_node_restarted_with_a_clock_behind_its_old_life_refutes_it_and_converges() -> None:
    sim = Simulation(41, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 10)
    victim = ids[3]
    sim.nodes[victim].upsert("endpoint:old-life", "1")
    sim.run_rounds_until(
        lambda: all("endpoint:old-life" in (holds(g, victim) or {}) for g in sim.live()), 40
    )
    old_life = sim.nodes[victim].incarnation
    sim.kill(victim)
    behind = old_life - 1000 * 10**9  # its clock is 1000 s behind the last life's
    g = restart(sim, victim, "endpoint:new-life", incarnation=behind)
    sim.join(victim, ids[0])  # the seed tells it about its old life: it outbids it
    assert newer(g.incarnation, old_life)

    def new_life_everywhere() -> bool:
        return all(
            (held := holds(other, victim)) is not None
            and "endpoint:new-life" in held
            and "endpoint:old-life" not in held
            for other in sim.live()
        )

    assert sim.run_rounds_until(new_life_everywhere, 40) <= 40


def test_a_node_that_left_and_came_back_under_the_same_id_is_live_again() -> None:
    sim = Simulation(31, loss=0.10, max_delay=3 * INTERVAL)
    ids = start_cluster(sim, 10)
    leaver = sim.nodes[ids[5]]
    leaver.upsert("endpoint:old-life", "1")
    notice = leaver.leave_request(sim.now)
    for addr in leaver.leave_targets()[:4]:
        sim.nodes[addr.rsplit(":", 1)[0]].handle_leave(notice, sim.now)
    sim.kill(leaver.node_id)
    sim.run_rounds_until(
        lambda: all((s := g.node_state(leaver.node_id)) is not None and s.left for g in sim.live()),
        30,
    )
    restart(sim, leaver.node_id, "endpoint:new-life")
    sim.join(leaver.node_id, ids[0])

    def back_everywhere() -> bool:
        return all(
            (held := holds(g, leaver.node_id)) is not None
            and "endpoint:new-life" in held
            and "endpoint:old-life" not in held
            for g in sim.live()
        )

    assert sim.run_rounds_until(back_everywhere, 40) <= 40
