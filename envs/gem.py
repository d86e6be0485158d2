"""GEM text games (`gem:<game>[:<difficulty>]`), package `gem-llm`: the offline games of the two-phase paper.

Games: guessthenumber, mastermind, sokoban, towerofhanoi, minesweeper, fifteenpuzzle, sudoku (GEM's
`game:<Name>-v0-<difficulty>` ids). Difficulty: `easy` (default), `hard` or `random`, e.g.
`gem:sokoban:hard`. The episode length is the game's own (`max_turns` of that difficulty; GEM ends the
game there and gives partial credit).

GEM games read the move from `\\boxed{...}`; here the agent writes `<action>MOVE</action>` like every other
environment, and the wrapper boxes it (the rules text in the system prompt is rewritten the same way).
A move the game rejects is the game's own feedback; a move it cannot parse ends the game, as in GEM.

Seeds and splits: a game is generated from its seed. GEM has no folds, so the splits are disjoint seed
ranges: train 0-79999, heldout 80000-99999, dev 100000-109999, test 110000-119999 (small games such as
easy GuessTheNumber repeat instances across seeds; no seed is shared). GEM draws from Python's and
NumPy's global random generators; the wrapper runs it on a private state so the caller's streams are
untouched. GEM seeds that state from the game's seed at every reset: the make seed changes nothing here.

Score: 1 on success, else GEM's accumulated reward clipped to 0..1 (its partial credit). GEM has no
expert, so the oracle is a solver per game acting on what the board shows: binary search
(GuessTheNumber), consistent guesses (Mastermind), optimal recursion from any position (Tower of Hanoi),
breadth-first search (Sokoban, 2x2 and 3x3 FifteenPuzzle; iterative-deepening A* within the turn budget
for 4x4), constraint propagation with backtracking (Sudoku), and safe-cell / mine deduction with a
least-risk guess when nothing follows (Minesweeper, which cannot always be solved without guessing).
`oracle_actions()` is None where the solver finds no plan (an unsolvable FifteenPuzzle shuffle: GEM
shuffles uniformly, so half its boards have no solution).
"""

from __future__ import annotations

import abc

import itertools
import logging
import re
from collections import deque

from envs.base import EnvError, TextEnv, not_installed, private_random

GAMES = {"guessthenumber": "GuessTheNumber", "mastermind": "Mastermind", "sokoban": "Sokoban",
         "towerofhanoi": "TowerofHanoi", "minesweeper": "Minesweeper", "fifteenpuzzle": "FifteenPuzzle",
         "sudoku": "Sudoku"}
NAMES = tuple(GAMES)
REQUIRES = {"gem": "gem-llm"}  # import name -> pip package (see envs.missing)
DIFFICULTIES = ("easy", "hard", "random")
FOLD_SEEDS = {"train": (0, 80000), "heldout": (80000, 100000), "dev": (100000, 110000), "test": (110000, 120000)}

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_GUESS_RE = re.compile(r"you guessed (\d+), and the target number is (higher|lower)")
_PEGS_RE = re.compile(r"you guessed \[([\d, ]+)\]\. This guess receives (\d+) black peg\(s\) and (\d+) white")


def _import_gem():
    """Import GEM, undoing the `logging.basicConfig` it runs at import time (it would reconfigure the
    caller's root logger)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import gem
    except ImportError:
        raise not_installed(REQUIRES["gem"]) from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return gem


def to_action_tags(text: str) -> str:
    """GEM's `\\boxed{X}` in rules and feedback, rewritten as this project's `<action>X</action>`."""
    return _BOXED_RE.sub(lambda m: f"<action>{m.group(1)}</action>", text)


class GEMEnv(TextEnv):
    max_turns = 50

    def __init__(self, game: str, difficulty: str = "", split: str = "train", seed: int = 0):
        super().__init__(split, seed)
        difficulty = difficulty or "easy"
        if difficulty not in DIFFICULTIES:
            raise EnvError(f"unknown difficulty {difficulty!r} for gem:{game}; use one of {', '.join(DIFFICULTIES)}")
        self.game, self.difficulty = game, difficulty
        self.task = f"gem:{game}"
        self.env_id = f"game:{GAMES[game]}-v0-{difficulty}"
        with private_random(self._rng_state):  # importing GEM draws random numbers, and so does building
            self._env = _import_gem().make(self.env_id)  # its envs (they reset)
        self._solver = _SOLVERS[game]()

    def _reset(self, seed: int):
        lo, hi = FOLD_SEEDS[self.split]
        with private_random(self._rng_state):
            rules, info = self._env.reset(seed=lo + seed % (hi - lo))
        self.max_turns = int(self._env.max_turns)  # per episode for the `random` difficulty
        self._rules = to_action_tags(rules)
        self._reward = 0.0
        self._solver.reset(self._env)
        obs = info.get("suffix") or "Enter your first guess."
        return to_action_tags(obs), {"success": False, "score": 0.0}

    def _step(self, action: str):
        inner = _BOXED_RE.fullmatch(action)  # an agent that boxed its move itself
        move = inner.group(1) if inner else action
        with private_random(self._rng_state):
            obs, reward, terminated, truncated, info = self._env.step("\\boxed{" + move + "}")
        self._solver.observe(move, obs, self._env)
        self._reward += float(reward)
        done = bool(terminated or truncated)
        success = bool(terminated and not truncated and obs.startswith("Congratulations"))
        score = 1.0 if success else max(0.0, min(1.0, self._reward))
        if not done and info.get("suffix"):
            obs = f"{obs.rstrip()}\n{info['suffix']}"
        return to_action_tags(obs), float(reward), done, {"success": success, "score": score}

    def system_prompt(self) -> str:
        return f"{self._rules.strip()}\nReply with one move as <action>MOVE</action>."

    def oracle_actions(self) -> list[str] | None:
        return self._solver.plan(self._env)

    def close(self) -> None:
        self._env = None


# --------------------------------------------------------------------------------------------------
# Solvers: `reset(env)` at the start of a game, `observe(move, feedback, env)` after each move, and
# `plan(env)`: the moves from the current position (possibly just the next one), or None.
# They read only what the game shows the player (board, feedback text, the game's stated parameters).
# --------------------------------------------------------------------------------------------------
class _Solver(abc.ABC):
    def reset(self, env):
        pass

    def observe(self, move, feedback, env):
        pass

    @abc.abstractmethod
    def plan(self, env):
        ...


class _SearchSolver(_Solver):
    """A solver that searches from a position (`_solve`) and follows the found plan while the position
    (`_key`) moves along it, searching again when it does not."""

    def reset(self, env):
        self._cached: tuple | None = None  # (position, plan) of the last search, advanced as it is followed

    def observe(self, move, feedback, env):
        if self._cached and self._cached[1] and self._cached[1][0] == move:
            self._cached = (self._key(env), self._cached[1][1:])

    def plan(self, env):
        key = self._key(env)
        if not self._cached or self._cached[0] != key:
            self._cached = (key, self._solve(env))
        plan = self._cached[1]
        return list(plan) if plan else None

    @abc.abstractmethod
    def _key(self, env):
        """A hashable description of the current position."""

    @abc.abstractmethod
    def _solve(self, env):
        """The moves that solve the game from the current position, or None."""


class _GuessTheNumber(_Solver):
    def reset(self, env):
        self.lo, self.hi = env.min_number, env.max_number

    def observe(self, move, feedback, env):
        m = _GUESS_RE.search(feedback)
        if m:
            guess = int(m.group(1))
            if m.group(2) == "higher":
                self.lo = max(self.lo, guess + 1)
            else:
                self.hi = min(self.hi, guess - 1)

    def plan(self, env):
        return [str((self.lo + self.hi) // 2)] if self.lo <= self.hi else None


class _Mastermind(_Solver):
    def reset(self, env):
        digits = range(1, env.num_numbers + 1)
        codes = (itertools.product(digits, repeat=env.code_length) if env.duplicate_numbers
                 else itertools.permutations(digits, env.code_length))
        self.candidates = list(codes)

    def observe(self, move, feedback, env):
        m = _PEGS_RE.search(feedback)
        if m:
            guess = tuple(int(x) for x in m.group(1).split(","))
            pegs = (int(m.group(2)), int(m.group(3)))
            self.candidates = [c for c in self.candidates if c != guess and _pegs(guess, c) == pegs]

    def plan(self, env):
        return [" ".join(map(str, self.candidates[0]))] if self.candidates else None


def _pegs(guess, code) -> tuple[int, int]:
    black = sum(g == c for g, c in zip(guess, code))
    common = sum(min(guess.count(d), code.count(d)) for d in set(guess))
    return black, common - black


class _TowerOfHanoi(_SearchSolver):
    def _key(self, env):
        return tuple(tuple(env.board[t]) for t in "ABC")

    def _solve(self, env):
        peg = {disk: t for t in "ABC" for disk in env.board[t]}
        moves = []

        def move_tower(k, target):  # disks 1..k onto `target`, optimal from any legal position
            if k == 0:
                return
            if peg[k] == target:
                move_tower(k - 1, target)
                return
            spare = ({"A", "B", "C"} - {peg[k], target}).pop()
            move_tower(k - 1, spare)
            moves.append(f"{peg[k]} {target}")
            peg[k] = target
            move_tower(k - 1, target)

        move_tower(env.num_disks, "C")
        return moves


_DIRS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


class _Sokoban(_SearchSolver):
    max_nodes = 300_000

    def _key(self, env):
        return env.room_state.tobytes()

    def _solve(self, env):
        fixed, state = env.room_fixed, env.room_state
        rows, cols = state.shape
        walls = {(r, c) for r in range(rows) for c in range(cols) if fixed[r, c] == 0}
        targets = frozenset((r, c) for r in range(rows) for c in range(cols) if fixed[r, c] == 2)
        boxes = frozenset((r, c) for r in range(rows) for c in range(cols) if state[r, c] in (3, 4))
        player = tuple(int(x) for x in env.player_position)

        def blocked(p):
            return p in walls or not (0 <= p[0] < rows and 0 <= p[1] < cols)

        def dead(p):  # a box in a non-target corner can never move again
            if p in targets:
                return False
            vert = blocked((p[0] - 1, p[1])) or blocked((p[0] + 1, p[1]))
            horiz = blocked((p[0], p[1] - 1)) or blocked((p[0], p[1] + 1))
            return vert and horiz

        start = (player, boxes)
        parent = {start: None}
        queue = deque([start])
        while queue and len(parent) < self.max_nodes:
            pos, bx = node = queue.popleft()
            if bx <= targets:
                moves = []
                while parent[node] is not None:
                    node, move = parent[node]
                    moves.append(move)
                return moves[::-1]
            for name, (dr, dc) in _DIRS.items():
                nxt = (pos[0] + dr, pos[1] + dc)
                if blocked(nxt):
                    continue
                nbx = bx
                if nxt in bx:
                    beyond = (nxt[0] + dr, nxt[1] + dc)
                    if blocked(beyond) or beyond in bx or dead(beyond):
                        continue
                    nbx = (bx - {nxt}) | {beyond}
                child = (nxt, nbx)
                if child not in parent:
                    parent[child] = (node, name)
                    queue.append(child)
        return None


# FifteenPuzzle moves slide a tile into the gap, so the gap moves the opposite way.
_GAP_MOVES = {"up": (1, 0), "down": (-1, 0), "left": (0, 1), "right": (0, -1)}


class _FifteenPuzzle(_SearchSolver):
    max_nodes = 100_000  # Python IDA* on 4x4 boards: a few seconds; no plan beyond that

    def _key(self, env):
        return tuple(0 if x is None else x for row in env.board for x in row)

    def _solve(self, env):
        n = env.num_rows
        start = self._key(env)
        goal = tuple(list(range(1, n * n)) + [0])
        if not _solvable(start, n):
            return None
        if start == goal:  # GEM can deal a solved board, but only counts a win after a move
            return ["down", "up"]
        if n <= 3:
            return _bfs_puzzle(start, goal, n)
        budget = env.max_turns - env.turn_count  # a longer solution could not be played anyway
        return _ida_puzzle(start, goal, n, budget, self.max_nodes)


def _neighbours(state, n):
    gap = state.index(0)
    r, c = divmod(gap, n)
    for name, (dr, dc) in _GAP_MOVES.items():
        rr, cc = r + dr, c + dc
        if 0 <= rr < n and 0 <= cc < n:
            s = list(state)
            s[gap], s[rr * n + cc] = s[rr * n + cc], 0
            yield name, tuple(s)


def _solvable(state, n) -> bool:
    tiles = [t for t in state if t]
    inversions = sum(a > b for i, a in enumerate(tiles) for b in tiles[i + 1:])
    if n % 2:
        return inversions % 2 == 0
    gap_row_from_bottom = n - state.index(0) // n
    return (inversions + gap_row_from_bottom) % 2 == 1


def _bfs_puzzle(start, goal, n):
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            moves = []
            while parent[node] is not None:
                node, move = parent[node]
                moves.append(move)
            return moves[::-1]
        for name, child in _neighbours(node, n):
            if child not in parent:
                parent[child] = (node, name)
                queue.append(child)
    return None


def _ida_puzzle(start, goal, n, max_depth, max_nodes):
    where = {t: divmod(i, n) for i, t in enumerate(goal)}

    def h(state):
        return sum(abs(i // n - where[t][0]) + abs(i % n - where[t][1]) for i, t in enumerate(state) if t)

    path, nodes = [], [0]

    def search(state, g, bound, prev):
        f = g + h(state)
        if f > bound:
            return f
        if state == goal:
            return True
        nodes[0] += 1
        if nodes[0] > max_nodes:
            return None
        best = float("inf")
        for name, child in _neighbours(state, n):
            if child == prev:
                continue
            path.append(name)
            t = search(child, g + 1, bound, state)
            if t is True or t is None:
                return t
            best = min(best, t)
            path.pop()
        return best

    bound = h(start)
    while bound <= max_depth:
        t = search(start, 0, bound, None)
        if t is True:
            return list(path)
        if t is None or t == float("inf"):
            return None
        bound = t
    return None


class _Sudoku(_SearchSolver):
    def _key(self, env):
        return tuple(x for row in env.board for x in row)

    def _solve(self, env):
        size = env.scale
        box = int(size ** 0.5)
        grid = [list(row) for row in env.board]
        empties = [(r, c) for r in range(size) for c in range(size) if grid[r][c] == 0]

        def options(r, c):
            used = set(grid[r]) | {grid[i][c] for i in range(size)}
            br, bc = box * (r // box), box * (c // box)
            used |= {grid[i][j] for i in range(br, br + box) for j in range(bc, bc + box)}
            return [d for d in range(1, size + 1) if d not in used]

        def fill():  # most-constrained cell first, backtracking
            open_cells = [(r, c) for r, c in empties if grid[r][c] == 0]
            if not open_cells:
                return True
            r, c = min(open_cells, key=lambda rc: len(options(*rc)))
            for d in options(r, c):
                grid[r][c] = d
                if fill():
                    return True
            grid[r][c] = 0
            return False

        if not fill():
            return None
        return [f"{r + 1} {c + 1} {grid[r][c]}" for r, c in empties]


class _Minesweeper(_Solver):
    """Flag cells proven mines (GEM counts a board solved only when every mine is flagged), reveal cells
    proven safe, else reveal the unknown cell least likely to hold a mine. Uses the game's mine count."""

    def plan(self, env):
        rows, cols = env.rows, env.cols
        if env.first_reveal:  # GEM keeps the first revealed cell and its neighbours free of mines
            return [f"reveal {rows // 2} {cols // 2}"]
        revealed = {(r, c) for r in range(rows) for c in range(cols) if env.revealed[r][c]}
        flagged = {(r, c) for r in range(rows) for c in range(cols) if env.flags[r][c]}
        hidden = {(r, c) for r in range(rows) for c in range(cols)} - revealed
        safe, mines = _deduce(env, revealed, hidden, flagged)
        # Flags first: GEM checks for a solved board only after a reveal, so the last move must be one.
        for cell in sorted(mines - flagged):
            return [f"flag {cell[0]} {cell[1]}"]
        for cell in sorted(safe - flagged):
            return [f"reveal {cell[0]} {cell[1]}"]
        unknown = sorted(hidden - mines - safe - flagged)
        if not unknown:
            return None
        density = (env.num_mines - len(mines)) / len(unknown)

        def risk(cell):  # the worst local estimate over the numbers next to the cell
            estimates = [density]
            for nb in _around(cell, rows, cols):
                if nb in revealed:
                    around = [x for x in _around(nb, rows, cols) if x in hidden]
                    left = env.grid[nb[0]][nb[1]] - sum(x in mines for x in around)
                    free = [x for x in around if x not in mines and x not in safe]
                    estimates.append(left / len(free) if free else 0.0)
            return max(estimates)

        cell = min(unknown, key=risk)
        return [f"reveal {cell[0]} {cell[1]}"]


def _around(cell, rows, cols):
    r, c = cell
    return [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
            if (dr or dc) and 0 <= r + dr < rows and 0 <= c + dc < cols]


def _deduce(env, revealed, hidden, flagged):
    """Cells proven safe and proven mines from the revealed numbers (single-number and subset rules)."""
    rows, cols = env.rows, env.cols
    safe, mines = set(), set(flagged)  # the solver only ever flags proven mines
    changed = True
    while changed:
        changed = False
        constraints = []
        for cell in revealed:
            number = env.grid[cell[0]][cell[1]]
            around = [x for x in _around(cell, rows, cols) if x in hidden]
            unknown = frozenset(x for x in around if x not in mines and x not in safe)
            left = number - sum(x in mines for x in around)
            if unknown:
                constraints.append((unknown, left))
        for unknown, left in constraints:
            if left == 0 and not unknown <= safe:
                safe |= unknown
                changed = True
            elif left == len(unknown) and not unknown <= mines:
                mines |= unknown
                changed = True
        if changed:
            continue
        for (a, la), (b, lb) in itertools.permutations(constraints, 2):
            if a < b:
                rest = b - a
                if lb - la == 0 and not rest <= safe:
                    safe |= rest
                    changed = True
                elif lb - la == len(rest) and not rest <= mines:
                    mines |= rest
                    changed = True
        total_left = env.num_mines - len(mines)
        unknown_all = hidden - mines - safe
        if not changed and unknown_all:
            if total_left == 0:
                safe |= unknown_all
                changed = True
            elif total_left == len(unknown_all):
                mines |= unknown_all
                changed = True
    return safe, mines


_SOLVERS = {"guessthenumber": _GuessTheNumber, "mastermind": _Mastermind, "sokoban": _Sokoban,
            "towerofhanoi": _TowerOfHanoi, "minesweeper": _Minesweeper, "fifteenpuzzle": _FifteenPuzzle,
            "sudoku": _Sudoku}


def make_env(name: str, params: str, split: str, seed: int) -> GEMEnv:
    return GEMEnv(name, params, split, seed)
