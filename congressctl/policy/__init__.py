"""Policy engine for Congress Datalog (OpenStack Congress's policy language), maintained incrementally.

    from congressctl.policy import Engine, Action, Result      # errors: congressctl.errors.PolicyError

Language: rules `head :- lit, ...` and facts; `not`/`NOT`/`!` negation; `;` or `.` ends a statement;
comments `//`, `#`, `/* */`; tables `t` (the rule's policy), `policy:t`, `datasource:t`; named columns
against a declared schema (`nova:servers(id=x, status="ACTIVE")`, unnamed columns free) or positional
arguments; int, float and double-quoted string constants; `builtin:` functions (see builtins.py);
`execute[ds:action(args)]` only as a head. Rules are checked when added (syntax, safety, arity/schema,
unknown column/builtin, recursion across policies, execute[] placement); see checks.py.

Semantics: set semantics; no recursion at all, so negation is stratified by construction. Derived state is
maintained by counting derivations (exact for non-recursive programs): each rule is compiled once into one
delta plan per body literal (compiler.py) probing hash indexes on the bound columns (store.py), so the cost
of a change follows the size of the change. Every change returns a Result: the rows that appeared and
vanished in each derived "policy:table", and the actions, i.e. the rows that appeared in execute tables.

Choices worth knowing:
- Execute tables are global per (datasource, action), keyed "execute[ds:action]": the same action row derived
  by two policies (or two rules) is one row, requested once when it appears, and only again after it has
  vanished. Execute rows are reported in Result.actions only (not in Result.deltas); read them with
  `rows("execute[ds:action]")`.
- Name resolution: `p:t` is a policy table if `p` is a policy (or the table is already known as a policy
  table), otherwise a datasource table. A datasource table that was never declared may be used
  positionally; its arity is fixed by its first use or its first rows. A name that rules used before it
  existed becomes a policy when created (so policies may be loaded in any order), unless it already has a
  schema or rows as a datasource (PolicyError kind "exists"); a policy name is never a datasource.
- Deleting a policy drops its rules; rules of other policies that read its tables keep reading them (empty)
  until the policy is created again.
- In `update`, deletions count before additions: a row both deleted and added ends up present.
- Trace and simulate (topdown.py, simulate.py) answer one query top-down over the engine's rules and rows,
  the latter through an overlay of updates: neither changes the engine.
- `builtin:now` is the engine clock as of creation or the last `Engine.tick()`, which re-derives the rules
  that use it; between ticks derived state never depends on when it was computed.
"""

from congressctl.policy.engine import Action, Engine, Result

__all__ = ["Action", "Engine", "Result"]
