"""The math of Shoal's sync modes and of stage recovery: pure functions and small state objects.

No networking lives here (torch and numpy only): every module can be tested with a few tensors.

- `demo`: DeMo: decoupled momentum, top-k DCT packets, chooser-averaged decode, sign step.
- `diloco`: DiLoCo: pseudo-gradients, their fp16/int8 wire format, the outer Nesterov step
  (synchronous and one-round-delayed), the inner AdamW.
- `spsa`: shared-seed SPSA: seeds, a device-independent Rademacher stream, exact perturb and
  restore, one-byte codes, integer-exact application, the ledger and replay.
- `robust`: deterministic mean, clipped mean and trimmed mean over replicas, with a report of
  which replicas each aggregate contains.
- `checkfree`: CheckFree / CheckFree+ rebuilding of a lost stage from its neighbours.
- `errors`: the ValueError subclasses all of the above raise.
"""
