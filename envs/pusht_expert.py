"""Scripted PushT expert with privileged state (docs/design.md §6): plan a push in a model, do it.

Each plan pre-scores every contact point on the T's outline (7.5 px apart) x a few push depths
by simulating the push alone in a freshly built pymunk model: the agent starts at rest at the
stand-off point and its PD target ramps along the inward normal, then holds. The objective is
the pose error (centre-of-gravity distance + 150 px per radian) far from the goal and
-100 x coverage near it (pose error < 20), where pushes are a few px deep at 5 px per step
("single-point" targets the critically damped agent lands on); a time cost per step is added.
The six best are rolled out in full from the true state (shortest path around the T with the
target moving <= 35 px per step and slowing as it arrives, settling at the stand-off point,
then the push); travel that touches the block is retried slower or dropped. The expert commits
to the chosen plan's targets and replans when they run out or the block leaves the predicted
poses. When no plan lowers the objective (a stall), a two-push lookahead picks the first push.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.pusht import (
    AGENT_RADIUS,
    GOAL_POSE,
    SUCCESS_COVERAGE,
    T_CENTER_OF_GRAVITY,
    T_OUTLINE,
    WORKSPACE_SIZE,
    PushTEnv,
    PushTSim,
    coverage,
    to_world,
)

RADIANS_TO_PX = 150.0
"""Pose-error weight of the angle: 1 rad of angle error counts as 150 px of centre distance."""
NEAR_GOAL_ERROR = 20.0
"""Below this pose error the expert maximises coverage directly with small pushes."""
MAX_TARGET_STEP = 35.0
"""Largest move of the PD target between two 10 Hz actions, in px."""
STANDOFF_GAP = 5.0
"""Gap between agent and T at the start of a push, in px."""
PATH_CLEARANCE = AGENT_RADIUS + 2.0
"""Smallest distance from the agent centre to the T's outline while travelling."""
CORNER_CLEARANCE = 32.0
"""Distance of the travel waypoints from the T's convex corners."""
ARENA_MARGIN = 16.0
"""The agent centre stays this far inside the workspace edge; the kinematic agent passes through
the walls (at 5 +- 2 px), which stop only the block."""
MID_GOAL_ERROR = 60.0
"""Between NEAR_GOAL_ERROR and this, pushes are shorter and slower than far from the goal."""
CONTACT_SPACING = 7.5
"""Spacing of the candidate contact points along the T's outline, in px."""
FAR_DEPTHS = (20.0, 40.0, 70.0, 100.0)
MID_DEPTHS = (6.0, 12.0, 20.0, 35.0)
NEAR_DEPTHS = (2.0, 4.0, 6.0, 9.0, 13.0)
"""Candidate push depths (px past first contact) by regime."""
NEAR_PUSH_SPEED = 5.0
"""PD target speed of the pushes near the goal, px per step."""
PUSH_HOLD_STEPS = 3
"""Steps the final push target is held so that the agent (and the block) come to rest."""
MAX_SETTLE_STEPS = 8
"""Most steps spent at the stand-off point waiting for the lagging agent to arrive."""
N_VERIFIED = 6
"""Best-prescored candidates re-simulated in full (travel + settle + push) from the true state."""
N_LOOKAHEAD = 4
"""Plans expanded by the two-push lookahead when no single push makes progress."""
SUCCESS_SCORE = -1000.0
"""Score of a plan that reaches success (minus the steps it takes), below any other score."""
NEAR_STEP_COST = 0.1
"""Score per step near the goal (100 x coverage units), i.e. 0.001 coverage per step."""
STALL_GAIN_FAR = 2.0
STALL_GAIN_NEAR = 0.3
"""Score gains below which the best plan counts as a stall (px of pose error far from the goal,
100 x coverage near it)."""


def _outline_edges() -> tuple[np.ndarray, np.ndarray]:
    starts = T_OUTLINE
    ends = np.roll(T_OUTLINE, -1, axis=0)
    return starts, ends


def _point_segment_distance(points: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Distance from points (..., 2) to segments (..., 2), broadcast."""
    direction = ends - starts
    length_sq = np.maximum(np.sum(direction * direction, axis=-1), 1e-12)
    t = np.clip(np.sum((points - starts) * direction, axis=-1) / length_sq, 0.0, 1.0)
    closest = starts + t[..., None] * direction
    return np.linalg.norm(points - closest, axis=-1)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _outline_distance(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Smallest distance between block-frame segments (M, 2)->(M, 2) and the T outline, (M,).

    Zero when a segment crosses the outline; a segment wholly inside the T is not detected,
    which cannot happen for segments between points outside the T.
    """
    edge_starts, edge_ends = _outline_edges()
    p0, p1 = starts[:, None, :], ends[:, None, :]
    q0, q1 = edge_starts[None], edge_ends[None]
    distance = np.minimum.reduce(
        [
            _point_segment_distance(p0, q0, q1),
            _point_segment_distance(p1, q0, q1),
            _point_segment_distance(q0, p0, p1),
            _point_segment_distance(q1, p0, p1),
        ]
    )
    d1, d2 = _cross(p1 - p0, q0 - p0), _cross(p1 - p0, q1 - p0)
    d3, d4 = _cross(q1 - q0, p0 - q0), _cross(q1 - q0, p1 - q0)
    crossing = (d1 * d2 < 0) & (d3 * d4 < 0)
    return np.where(crossing, 0.0, distance).min(axis=1)


def _inside_t(points: np.ndarray) -> np.ndarray:
    x, y = points[..., 0], points[..., 1]
    in_bar = (np.abs(x) <= 60) & (y >= 0) & (y <= 30)
    in_stem = (np.abs(x) <= 15) & (y >= 30) & (y <= 120)
    return in_bar | in_stem


def _make_contacts() -> tuple[np.ndarray, np.ndarray]:
    """Candidate contacts on the outline (block frame) whose stand-off point is clear of the T.

    Points are spaced symmetrically about each edge's middle, so the pushes through the centre
    of gravity (middle of the bar's outer edge and of the stem's end) are among them.
    """
    points, normals = [], []
    edge_starts, edge_ends = _outline_edges()
    for start, end in zip(edge_starts, edge_ends, strict=True):
        length = np.linalg.norm(end - start)
        tangent = (end - start) / length
        normal = np.array([tangent[1], -tangent[0]])
        count = int(np.floor(length / CONTACT_SPACING))
        offsets = (np.arange(count + 1) - count / 2) * CONTACT_SPACING + length / 2
        for offset in np.clip(offsets, 1.0, length - 1.0):
            points.append(start + offset * tangent)
            normals.append(normal)
    points, normals = np.array(points), np.array(normals)
    standoffs = points + normals * (AGENT_RADIUS + STANDOFF_GAP)
    clear = _outline_distance(standoffs, standoffs) >= PATH_CLEARANCE + 1.0
    return points[clear], normals[clear]


CONTACT_POINTS, CONTACT_NORMALS = _make_contacts()
"""Candidate contact points on the T outline and their outward normals, block frame."""

_CORNERS = np.array([[-60, 0], [60, 0], [60, 30], [15, 120], [-15, 120], [-60, 30]], dtype=float)
_CORNER_DIRECTIONS = np.array([[-1, -1], [1, -1], [1, 1], [1, 1], [-1, 1], [-1, 1]]) / np.sqrt(2)
WAYPOINTS = _CORNERS + CORNER_CLEARANCE * _CORNER_DIRECTIONS
"""Travel waypoints off the T's six convex corners, block frame."""


def pose_error(block_pose: np.ndarray) -> np.ndarray:
    """Distance of the centre of gravity to the goal's plus 150 px per radian of angle error."""
    pose = np.asarray(block_pose, dtype=np.float64)
    cog = to_world(np.array([T_CENTER_OF_GRAVITY]), pose)[..., 0, :]
    goal_cog = to_world(np.array([T_CENTER_OF_GRAVITY]), GOAL_POSE)[0]
    angle_error = np.angle(np.exp(1j * (pose[..., 2] - GOAL_POSE[2])))
    return np.linalg.norm(cog - goal_cog, axis=-1) + RADIANS_TO_PX * np.abs(angle_error)


def _to_block_frame(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    shifted = np.asarray(points, dtype=np.float64) - pose[:2]
    return np.stack(
        [
            cos * shifted[..., 0] + sin * shifted[..., 1],
            -sin * shifted[..., 0] + cos * shifted[..., 1],
        ],
        axis=-1,
    )


def _in_arena(points: np.ndarray) -> np.ndarray:
    return np.all((points >= ARENA_MARGIN) & (points <= WORKSPACE_SIZE - ARENA_MARGIN), axis=-1)


def _travel_paths(
    start: np.ndarray, goals: np.ndarray, pose: np.ndarray
) -> tuple[list, np.ndarray]:
    """Shortest paths (world polylines) from ``start`` to each goal around the T, and lengths.

    Visibility graph over the waypoints off the T's convex corners; a segment is usable when it
    keeps ``PATH_CLEARANCE`` from the outline. Unreachable goals get length inf.
    """
    local_start = _to_block_frame(start, pose)
    retreat = _retreat_point(local_start)
    if retreat is not None:
        local_start = retreat
    local_goals = _to_block_frame(goals, pose)
    waypoints_world = np.clip(
        to_world(WAYPOINTS, pose), ARENA_MARGIN, WORKSPACE_SIZE - ARENA_MARGIN
    )
    nodes = np.concatenate([local_start[None], _to_block_frame(waypoints_world, pose)])
    n_nodes = len(nodes)
    pairs_i, pairs_j = np.triu_indices(n_nodes, 1)
    clear = _outline_distance(nodes[pairs_i], nodes[pairs_j]) >= PATH_CLEARANCE
    length = np.linalg.norm(nodes[pairs_i] - nodes[pairs_j], axis=-1)
    graph = np.full((n_nodes, n_nodes), np.inf)
    graph[pairs_i[clear], pairs_j[clear]] = length[clear]
    graph[pairs_j[clear], pairs_i[clear]] = length[clear]
    distance_from_start, previous = _dijkstra(graph)
    goal_i = np.repeat(np.arange(len(goals)), n_nodes)
    node_j = np.tile(np.arange(n_nodes), len(goals))
    goal_clear = _outline_distance(local_goals[goal_i], nodes[node_j]) >= PATH_CLEARANCE
    leg = np.linalg.norm(local_goals[goal_i] - nodes[node_j], axis=-1)
    total = np.where(goal_clear, leg + distance_from_start[node_j], np.inf)
    total = total.reshape(len(goals), n_nodes)
    best_node = np.argmin(total, axis=1)
    lengths = total[np.arange(len(goals)), best_node]
    paths = []
    for goal, node, path_length in zip(goals, best_node, lengths, strict=True):
        if not np.isfinite(path_length):
            paths.append(None)
            continue
        chain = []
        while node != 0:
            chain.append(node)
            node = previous[node]
        world_nodes = [waypoints_world[i - 1] for i in reversed(chain)]
        if retreat is not None:
            world_nodes.insert(0, to_world(retreat[None], pose)[0])
        paths.append(np.array([start, *world_nodes, goal]))
    if retreat is not None:
        lengths = lengths + np.linalg.norm(retreat - _to_block_frame(start, pose))
    return paths, lengths


def _retreat_point(local_point: np.ndarray) -> np.ndarray | None:
    """Nearby block-frame point clear of the T, when ``local_point`` is closer than clearance.

    Repeatedly steps straight away from the nearest outline point, so that in the pocket
    between bar and stem it ends up clear of both faces.
    """
    edge_starts, edge_ends = _outline_edges()
    point, moved = np.asarray(local_point, dtype=np.float64), False
    for _ in range(6):
        distances = _point_segment_distance(point[None], edge_starts, edge_ends)
        nearest = int(np.argmin(distances))
        if distances[nearest] >= PATH_CLEARANCE + 0.5 and not _inside_t(point[None])[0]:
            return point if moved else None
        start, end = edge_starts[nearest], edge_ends[nearest]
        direction = end - start
        t = np.clip(np.dot(point - start, direction) / np.dot(direction, direction), 0.0, 1.0)
        closest = start + t * direction
        away = point - closest
        if _inside_t(point[None])[0] or np.linalg.norm(away) < 1e-6:
            away = np.array([direction[1], -direction[0]])
        point, moved = closest + away / np.linalg.norm(away) * (PATH_CLEARANCE + 3.0), True
    return point


def _dijkstra(graph: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_nodes = len(graph)
    distance = np.full(n_nodes, np.inf)
    distance[0] = 0.0
    previous = np.zeros(n_nodes, dtype=int)
    done = np.zeros(n_nodes, dtype=bool)
    for _ in range(n_nodes):
        node = int(np.argmin(np.where(done, np.inf, distance)))
        if not np.isfinite(distance[node]):
            break
        done[node] = True
        relaxed = distance[node] + graph[node]
        better = relaxed < distance
        distance[better] = relaxed[better]
        previous[better] = node
    return distance, previous


def _point_along(path: np.ndarray, distance: float) -> np.ndarray:
    segments = np.diff(path, axis=0)
    lengths = np.linalg.norm(segments, axis=1)
    for start, segment, length in zip(path[:-1], segments, lengths, strict=True):
        if distance <= length:
            return start + segment * (distance / max(length, 1e-9))
        distance -= length
    return path[-1].copy()


def _push_targets(
    standoff: np.ndarray, normal: np.ndarray, depth: float, speed: float
) -> np.ndarray:
    """PD targets that ramp from the stand-off point ``depth`` px past the contact, then hold."""
    stroke = STANDOFF_GAP + depth
    advance = np.minimum(np.arange(1, int(np.ceil(stroke / speed)) + 1) * speed, stroke)
    advance = np.concatenate([advance, np.full(PUSH_HOLD_STEPS, stroke)])
    return standoff[None] - advance[:, None] * normal[None]


def _simulate_push(standoff: np.ndarray, block_pose: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Block poses (n, 3) after each of n PD targets, the agent starting at rest at ``standoff``."""
    sim = PushTSim()
    sim.set_state_exact(np.array([*standoff, *block_pose]))
    poses = np.empty((len(targets), 3))
    for k, target in enumerate(targets):
        sim.step((float(target[0]), float(target[1])))
        poses[k] = sim.block_pose
    return poses


@dataclass(frozen=True)
class _Regime:
    """How hard and how fast to push, and what to optimise, for a range of pose errors."""

    depths: tuple[float, ...]
    push_speed: float
    near: bool
    settle_distance: float
    settle_speed: float


@dataclass
class _Candidate:
    """A push to consider: travel ``path`` to its stand-off point, then ``push_targets``."""

    path: np.ndarray
    push_targets: np.ndarray
    prescore: float


@dataclass
class _Plan:
    """PD targets to send, one per step, and the model's block pose after each of them."""

    targets: np.ndarray
    block_poses: np.ndarray
    agent_position: np.ndarray
    objective: float = 0.0
    score: float = 0.0


class _PlanRecorder:
    """Steps a fresh model from the true state and records the targets sent and block poses."""

    def __init__(
        self, agent: np.ndarray, velocity: np.ndarray, block: np.ndarray, last_target: np.ndarray
    ) -> None:
        self.sim = PushTSim()
        self.sim.set_state_exact(np.array([*agent, *block]), velocity)
        self.previous = last_target
        self.targets: list[np.ndarray] = []
        self.poses: list[np.ndarray] = []

    def send(self, target: np.ndarray) -> None:
        step = target - self.previous
        length = float(np.linalg.norm(step))
        if length > MAX_TARGET_STEP:
            target = self.previous + step * (MAX_TARGET_STEP / length)
        target = np.clip(target, 0.0, WORKSPACE_SIZE)
        self.sim.step((float(target[0]), float(target[1])))
        self.targets.append(target)
        self.poses.append(self.sim.block_pose)
        self.previous = target

    def agent_touches_block(self) -> bool:
        local = _to_block_frame(self.sim.agent_position, self.sim.block_pose)[None]
        return bool(_outline_distance(local, local)[0] < AGENT_RADIUS + 0.5 or _inside_t(local)[0])

    def plan(self) -> _Plan:
        return _Plan(np.array(self.targets), np.array(self.poses), self.sim.agent_position)


def _rollout_plan(
    agent: np.ndarray,
    velocity: np.ndarray,
    block: np.ndarray,
    last_target: np.ndarray,
    candidate: _Candidate,
    travel_speed: float,
    regime: _Regime,
) -> _Plan | None:
    """Simulate travel to the stand-off point, settling there, then the push; None on a bump.

    The travel target slows down as it nears the stand-off point (the PD agent lags about
    2 x speed x 0.1 s behind it); any contact with the block before the push counts as a bump.
    """
    recorder = _PlanRecorder(agent, velocity, block, last_target)
    path = candidate.path
    total = float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum())
    progress = 0.0
    while progress < total - 1e-9:
        progress = min(total, progress + min(travel_speed, 4.0 + 0.5 * (total - progress)))
        recorder.send(_point_along(path, progress))
        if recorder.agent_touches_block():
            return None
    for _ in range(MAX_SETTLE_STEPS):
        sim = recorder.sim
        if (
            np.linalg.norm(sim.agent_position - path[-1]) < regime.settle_distance
            and np.linalg.norm(sim.agent_velocity) < regime.settle_speed
        ):
            break
        recorder.send(path[-1])
        if recorder.agent_touches_block():
            return None
    for target in candidate.push_targets:
        recorder.send(target)
    return recorder.plan()


class PushTExpert:
    """Scripted PushT expert: planned pushes far from the goal, coverage maximisation near it.

    ``diversity`` in [0, 1] scales the per-episode randomisation (step cost, travel and push
    speed) and the sampling among the three best plans far from the goal; 0 is deterministic.
    """

    def __init__(
        self, rng: int | np.random.Generator | None = None, diversity: float = 0.5
    ) -> None:
        self.rng = np.random.default_rng(rng)
        self.diversity = float(diversity)
        self.reset()

    def reset(self) -> None:
        """Forget the current plan and draw this episode's step cost and speeds."""
        jitter = 1.0 + self.diversity * self.rng.uniform(-0.5, 0.5, size=3)
        self.step_cost = 1.5 * jitter[0]
        self.travel_speed = min(MAX_TARGET_STEP, 30.0 * jitter[1])
        self.push_speed = 22.0 * jitter[2]
        self.plan: _Plan | None = None
        self.plan_step = 0
        self.last_target: np.ndarray | None = None

    def act(self, env: PushTEnv) -> np.ndarray:
        """Next PD target (2,) float32 for the env's current state (reads its pymunk model)."""
        sim = env.unwrapped.sim
        agent, velocity, block = sim.agent_position, sim.agent_velocity, sim.block_pose
        if self.last_target is None:
            self.last_target = agent
        if self.plan is None or self.plan_step >= len(self.plan.targets) or self._off_plan(block):
            self.plan = self._make_plan(agent, velocity, block)
            self.plan_step = 0
        self.last_target = self.plan.targets[self.plan_step]
        self.plan_step += 1
        return self.last_target.astype(np.float32)

    def _off_plan(self, block: np.ndarray) -> bool:
        if self.plan_step == 0:
            return False
        expected = self.plan.block_poses[self.plan_step - 1]
        return bool(
            np.linalg.norm(block[:2] - expected[:2]) > 1.0 or abs(block[2] - expected[2]) > 0.01
        )

    def _regime(self, block: np.ndarray) -> _Regime:
        error = float(pose_error(block))
        if error < NEAR_GOAL_ERROR:
            return _Regime(NEAR_DEPTHS, NEAR_PUSH_SPEED, True, 1.0, 10.0)
        if error < MID_GOAL_ERROR:
            return _Regime(MID_DEPTHS, 0.5 * self.push_speed, False, 2.0, 20.0)
        return _Regime(FAR_DEPTHS, self.push_speed, False, 3.0, 30.0)

    @staticmethod
    def _objective(poses: np.ndarray, near: bool) -> np.ndarray:
        """What a push should lower: pose error far from the goal, -100 x coverage near it."""
        return -100.0 * np.asarray(coverage(poses)) if near else pose_error(poses)

    def _time_cost(self, n_steps: np.ndarray | int, near: bool) -> np.ndarray:
        """Score added per step a plan takes, in objective units."""
        return (NEAR_STEP_COST if near else self.step_cost) * np.asarray(n_steps)

    def _candidates(
        self, agent: np.ndarray, block: np.ndarray, regime: _Regime
    ) -> list[_Candidate]:
        """Every reachable contact x depth, scored by simulating the push alone, best first."""
        points = to_world(CONTACT_POINTS, block)
        normals = to_world(CONTACT_NORMALS, np.array([0.0, 0.0, block[2]]))
        standoffs = points + normals * (AGENT_RADIUS + STANDOFF_GAP)
        paths, lengths = _travel_paths(agent, standoffs, block)
        candidates, final_poses, n_steps = [], [], []
        for i in np.flatnonzero(_in_arena(standoffs) & np.isfinite(lengths)):
            for depth in regime.depths:
                targets = _push_targets(standoffs[i], normals[i], depth, regime.push_speed)
                candidates.append(_Candidate(paths[i], targets, 0.0))
                final_poses.append(_simulate_push(standoffs[i], block, targets)[-1])
                n_steps.append(lengths[i] / self.travel_speed + len(targets))
        if not candidates:
            return []
        scores = self._objective(np.array(final_poses), regime.near) + self._time_cost(
            np.array(n_steps), regime.near
        )
        for candidate, score in zip(candidates, scores, strict=True):
            candidate.prescore = float(score)
        return sorted(candidates, key=lambda candidate: candidate.prescore)

    def _make_plan(self, agent: np.ndarray, velocity: np.ndarray, block: np.ndarray) -> _Plan:
        regime = self._regime(block)
        plans = []
        for candidate in self._candidates(agent, block, regime)[:N_VERIFIED]:
            plan = self._rollout(agent, velocity, block, candidate, regime)
            if plan is not None:
                plans.append(plan)
        if not plans:
            return self._escape_plan(agent, velocity, block)
        plans.sort(key=lambda plan: plan.score)
        current = float(self._objective(block, regime.near))
        gain = STALL_GAIN_NEAR if regime.near else STALL_GAIN_FAR
        progressing = [plan for plan in plans if plan.objective < current - gain]
        if not progressing:
            return self._lookahead(plans, regime)
        if regime.near or self.diversity <= 0:
            return progressing[0]
        top = progressing[:3]
        scores = np.array([plan.score for plan in top])
        weights = np.exp(-(scores - scores[0]) / (2.0 * self.diversity))
        return top[int(self.rng.choice(len(top), p=weights / weights.sum()))]

    def _rollout(
        self,
        agent: np.ndarray,
        velocity: np.ndarray,
        block: np.ndarray,
        candidate: _Candidate,
        regime: _Regime,
    ) -> _Plan | None:
        """Simulate a candidate from the true state, slowing the travel down if it bumps."""
        speed = self.travel_speed
        for _ in range(3):
            plan = _rollout_plan(agent, velocity, block, self.last_target, candidate, speed, regime)
            if plan is not None:
                success = np.flatnonzero(coverage(plan.block_poses) > SUCCESS_COVERAGE)
                if len(success):  # the episode ends there: sooner is better
                    plan.objective = SUCCESS_SCORE
                    plan.score = SUCCESS_SCORE + float(success[0])
                else:
                    plan.objective = float(self._objective(plan.block_poses[-1], regime.near))
                    plan.score = plan.objective + float(
                        self._time_cost(len(plan.targets), regime.near)
                    )
                return plan
            speed *= 0.6
        return None

    def _lookahead(self, plans: list[_Plan], regime: _Regime) -> _Plan:
        """Stalled: pick the first push whose best follow-up push scores best."""
        best_plan, best_score = plans[0], np.inf
        for plan in plans[:N_LOOKAHEAD]:
            final_pose = plan.block_poses[-1]
            follow_ups = self._candidates(plan.agent_position, final_pose, self._regime(final_pose))
            if not follow_ups:
                continue
            score = follow_ups[0].prescore + self._time_cost(len(plan.targets), regime.near)
            if score < best_score:
                best_plan, best_score = plan, score
        return best_plan

    def _escape_plan(self, agent: np.ndarray, velocity: np.ndarray, block: np.ndarray) -> _Plan:
        """No push is reachable: back 40 px away from the block's centre, then plan again."""
        away = agent - to_world(np.array([T_CENTER_OF_GRAVITY]), block)[0]
        away = away / max(float(np.linalg.norm(away)), 1e-6) * 40.0
        goal = np.clip(agent + away, ARENA_MARGIN, WORKSPACE_SIZE - ARENA_MARGIN)
        recorder = _PlanRecorder(agent, velocity, block, self.last_target)
        for fraction in (0.4, 0.8, 1.0):
            recorder.send(agent + (goal - agent) * fraction)
        return recorder.plan()


def run_expert_episode(env: PushTEnv, expert: PushTExpert, seed: int, max_steps: int = 300) -> dict:
    """Roll the expert out from ``env.reset(seed=seed)``; per-step arrays in DP's zarr layout.

    Returns ``state`` (T, 5), ``keypoint`` (T, 9, 2), ``action`` (T, 2) (float32; the
    observation at step t with the action taken at step t) and ``final_coverage``,
    ``max_coverage``, ``success`` (coverage > 0.95 reached), ``n_steps``.
    """
    _, info = env.reset(seed=seed)
    expert.reset()
    base_env = env.unwrapped
    states, keypoints, actions = [], [], []
    coverages = [info["coverage"]]
    for _ in range(max_steps):
        states.append(base_env.get_state())
        keypoints.append(base_env.keypoints())
        action = expert.act(env)
        actions.append(action)
        _, _, terminated, truncated, info = env.step(action)
        coverages.append(info["coverage"])
        if terminated or truncated:
            break
    return {
        "state": np.array(states, dtype=np.float32),
        "keypoint": np.array(keypoints, dtype=np.float32),
        "action": np.array(actions, dtype=np.float32),
        "final_coverage": float(coverages[-1]),
        "max_coverage": float(max(coverages)),
        "success": bool(max(coverages) > SUCCESS_COVERAGE),
        "n_steps": len(actions),
    }
