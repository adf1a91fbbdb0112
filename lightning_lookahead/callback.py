"""LookaheadCallback: maps Lightning Trainer hooks onto :class:`~lightning_lookahead.lookahead.Lookahead`."""

from __future__ import annotations

import importlib
import sys
import weakref
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_lookahead import checkpoint as checkpoint_io
from lightning_lookahead import distributed
from lightning_lookahead import local_sgd as local_steps
from lightning_lookahead.checkpoint import (  # noqa: F401  (re-exported: the names of earlier releases)
    CHECKPOINT_KEY,
    FAST_PREFIX,
    MOMENT_PREFIX,
    MOMENTUM_PREFIX,
    NOT_STARTED,
    TENSOR_ENTRIES,
)
from lightning_lookahead.config import (
    AveragePrecision,
    LocalSGDConfig,
    LookaheadConfig,
    OnNonFinite,
    check_bool,
    check_choice,
    check_optional_int,
)
from lightning_lookahead.inner_state import InnerState
from lightning_lookahead.lookahead import Lookahead
from lightning_lookahead.outer import OuterOptimizerFactory

EvalWeights = Literal["slow", "fast"]


class LookaheadCallback(Callback):
    r"""Lookahead (Zhang, Lucas, Hinton, Ba, 2019) for any Lightning training run.

    The optimizers from ``configure_optimizers`` stay untouched (no wrapper), so Lightning's
    optimizer, LR-scheduler, AMP and accumulation logic keep working. The callback keeps slow
    weights :math:`\phi` (equal to the fast weights :math:`\theta` at the start of fit) and after
    every ``k`` *real* steps of an optimizer (accumulated batches count once, AMP-skipped steps
    not at all) sets :math:`\phi \leftarrow \phi + \alpha(\theta - \phi)`, :math:`\theta \leftarrow \phi`
    for that optimizer's parameters. Buffers (e.g. BatchNorm statistics) are not averaged.

    Validation (including the sanity check), testing and prediction see the slow weights, and
    ``checkpoint["state_dict"]`` holds them, so ``Model.load_from_checkpoint(path)`` gives the
    deployable model without this callback. The fast weights and step counters ride along in the
    checkpoint, so ``trainer.fit(..., ckpt_path=path)`` continues exactly. From this callback's
    ``on_train_end`` on (so in ``LightningModule.on_train_end``, in every callback listed after
    this one, and in ``on_fit_end``) the module holds the slow weights. During training the trained
    parameters are views of one flat buffer per (device, dtype) (see :class:`~lightning_lookahead.Lookahead`);
    when fit ends, also by an exception, every parameter owns its storage again.

    Args:
        k: optimizer steps between syncs (per optimizer), an int >= 1.
        alpha: slow-weight step size in (0, 1]. ``k=1, alpha=1`` is plain training.
        inner_state: what happens to the optimizer state at a sync: ``"keep"`` (the paper's),
            ``"reset"`` (moments and step counts back to their initial values) or ``"pullback"``
            (first moments interpolated like the weights). Supported for SGD, Adam, AdamW, NAdam, RAdam.
        outer_momentum: momentum ``mu`` in [0, 1) on the slow step, which is SGD with learning rate
            ``alpha`` on the pseudo-gradient ``phi - theta``. ``0`` (default) is Lookahead; ``0.9``
            with ``nesterov=True`` is SNOO (Kallusky et al., 2025) and, with ``alpha=0.7``, DiLoCo's
            outer step (Douillard et al., 2023); ``nesterov=False`` is SlowMo's heavy ball. Costs one
            more copy of the trained parameters (the buffer, saved in checkpoints with the fast weights).
        nesterov: Nesterov (default) or heavy-ball momentum; only used when ``outer_momentum > 0``.
        outer_optimizer: any optimizer as the slow step: a factory over the slow weights, stepped on
            phi with gradient ``phi - theta`` (torchft's DiLoCo outer step), e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)`` or, in Hydra, a ``_target_`` with
            ``_partial_: true``. ``alpha`` and ``outer_momentum`` must then stay at their defaults.
            Its state is checkpointed by parameter name (not with FSDP2: refused there).
        eval_weights: ``"slow"`` (default) or ``"fast"``: which weights validation sees during fit.
        on_nonfinite: ``"warn"`` (once) or ``"raise"`` when the fast weights hold inf/nan at a
            sync; the sync is skipped either way and the slow weights are never contaminated.
        check_ranks_every: in multi-process runs, compare the slow weights and the step counters
            across ranks about every this many syncs (every ``check_ranks_every * k`` optimizer
            steps' worth of batches, which all ranks run together, and at the end of training)
            with one collective, and raise :class:`~lightning_lookahead.RankMismatchError` on
            every rank on a mismatch; ``None`` never.
        log_stats: log ``lookahead/syncs``, ``lookahead/rel_distance``
            (:math:`\|\theta-\phi\|/\|\phi\|` before the latest sync) and, with an outer optimizer,
            ``lookahead/rel_outer_step`` (:math:`\|\phi_{new}-\phi\|/\|\phi\|`) at the Trainer's logging
            cadence (``log_every_n_steps``), only when a sync happened since the last row. The
            distance is measured only on the syncs whose value reaches a row (the last one before
            it), and only when the Trainer has a logger or ``prog_bar=True``.
        local_sgd: under DDP with several processes, local SGD (DiLoCo's inner/outer split): each
            worker (``ranks_per_worker`` ranks) trains its own fast weights on its own data, DDP's
            gradient all-reduce confined to the worker and DDP's buffer broadcast off; every sync
            first averages the fast weights and floating buffers over the workers, then takes the
            slow step (plain Lookahead, the outer momentum step: SlowMo / DiLoCo, or
            ``outer_optimizer``). Logs ``lookahead/inter_bytes_per_step`` (sent between workers) and
            ``lookahead/intra_bytes_per_step`` (inside them). A single process: plain Lookahead with a
            warning. FSDP2, static-graph DDP, DDP comm hooks and GradScaler are refused at setup.
            Checkpoints carry every rank's fast weights, buffers and optimizer state, so resuming with
            the same number of ranks and grouping continues exactly.
        ranks_per_worker: with ``local_sgd``, ranks per worker: an int dividing the world size, or
            ``"node"`` (``Trainer(devices=...)``, the ranks of one node). Inside a worker gradients
            are all-reduced at every step as plain DDP would; between workers only the syncs
            communicate, and each rank sends only its ``1/ranks_per_worker`` slice of the weights
            across (a hierarchical all-reduce). ``1`` (default): every rank is a worker.
        local_sgd_start: with ``local_sgd``, optimizer steps of ordinary DDP over the whole world
            (with Lookahead's syncs as usual) before the local steps begin (post-local SGD's and
            DiLoCo's warm start). Counted like ``k`` (real steps of the first optimizer).
        average_precision: with ``local_sgd``, ``"full"`` (default: the weights' own dtype) or
            ``"bf16"``: the pseudo-gradients ``theta_w - phi`` cross between workers as bfloat16
            and are summed in float32 on arrival, so the outer step sees
            ``phi + mean_w bf16(theta_w - phi)``; half the bytes of float32. Buffers stay exact.
        prog_bar: also show these values in the progress bar. Either way they are in
            ``trainer.callback_metrics`` (``lookahead/syncs`` from the first training batch on, the
            rest from the first sync), updated with the logger rows, so ``EarlyStopping`` or
            ``ModelCheckpoint`` can monitor them: ``lookahead/syncs`` is the current sync count,
            ``lookahead/rel_distance`` the latest sync's distance (measured when the Trainer has a
            logger or ``prog_bar=True``).

    Example::

        import lightning as L
        from lightning_lookahead import LookaheadCallback

        trainer = L.Trainer(max_epochs=10, callbacks=[LookaheadCallback(k=5, alpha=0.5)])
        trainer.fit(model, datamodule=dm)        # validation runs on the slow weights
        trainer.test(model, datamodule=dm)       # so does testing: the module holds them now
    """

    def __init__(
        self,
        k: int = 5,
        alpha: float = 0.5,
        inner_state: InnerState = "keep",
        eval_weights: EvalWeights = "slow",
        on_nonfinite: OnNonFinite = "warn",
        check_ranks_every: int | None = None,
        log_stats: bool = True,
        outer_momentum: float = 0.0,
        nesterov: bool = True,
        local_sgd: bool = False,
        prog_bar: bool = False,
        outer_optimizer: OuterOptimizerFactory | None = None,
        ranks_per_worker: int | Literal["node"] = 1,
        local_sgd_start: int = 0,
        average_precision: AveragePrecision = "full",
    ) -> None:
        self.config = LookaheadConfig(k, alpha, inner_state, on_nonfinite, outer_momentum, nesterov, outer_optimizer)
        self.log_stats = check_bool("log_stats", log_stats)
        self.local_config = LocalSGDConfig(local_sgd, ranks_per_worker, local_sgd_start, average_precision)
        self.prog_bar = check_bool("prog_bar", prog_bar)
        self._workers: local_steps.Workers | None = None  # local SGD in a multi-process DDP fit (set up at fit)
        self.lookahead = Lookahead(config=self.config, measure_distance=False)
        self.eval_weights: EvalWeights = check_choice("eval_weights", eval_weights, ("slow", "fast"))  # type: ignore[assignment]
        self.check_ranks_every = check_optional_int("check_ranks_every", check_ranks_every)
        self._reset_run_state()
        self._stage: str | None = None
        self._dropped = False  # our state was dropped when a checkpoint was loaded after fit
        self._warned: set[str] = set()

    def _reset_run_state(self) -> None:
        self._pending: dict[str, Any] | None = None  # checkpoint tensors waiting to be applied
        self._pending_state: dict[str, Any] | None = None  # checkpoint counters, likewise
        self._eval_swapped = False  # we swapped the slow weights in for an evaluation loop
        self._logged_syncs = 0  # lookahead.syncs + skipped at the last logger row (or at attach)
        self._published = False  # lookahead/syncs is in trainer.callback_metrics since the last attach
        self._batches = 0  # training batches this fit, identical on every rank (the rank-check clock)

    # the settings as attributes: the validated config's values
    k = property(lambda self: self.config.k)
    alpha = property(lambda self: self.config.alpha)
    inner_state = property(lambda self: self.config.inner_state)
    on_nonfinite = property(lambda self: self.config.on_nonfinite)
    outer_momentum = property(lambda self: self.config.outer_momentum)
    nesterov = property(lambda self: self.config.nesterov)
    outer_optimizer = property(lambda self: self.config.outer_optimizer)
    local_sgd = property(lambda self: self.local_config.enabled)
    ranks_per_worker = property(lambda self: self.local_config.ranks_per_worker)
    local_sgd_start = property(lambda self: self.local_config.start)
    average_precision = property(lambda self: self.local_config.average_precision)

    @property
    def _local_active(self) -> bool:
        return self._workers is not None

    @property
    def _averager(self) -> local_steps.WeightAverager | None:
        sync = self.lookahead.before_sync
        return sync if isinstance(sync, local_steps.WeightAverager) else None

    def _new_core(self) -> Lookahead:
        averager = local_steps.WeightAverager(self.local_config, self._workers) if self._workers is not None else None
        return Lookahead(config=self.config, before_sync=averager)

    @property
    def attached(self) -> bool:
        """True once this fit's slow weights exist (from the start of training until the next fit)."""
        return bool(self.lookahead.groups)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if sum(isinstance(c, LookaheadCallback) for c in trainer.callbacks) > 1:  # type: ignore[attr-defined]
            raise ValueError("Only one LookaheadCallback can be used per Trainer.")
        check_strategy(trainer)
        check_callbacks(trainer)
        self._stage = stage
        if stage != "fit":
            return
        self._set_up_workers(trainer)
        self.lookahead.detach()
        self._dropped = False
        self.lookahead = self._new_core()  # every fit starts from the module's current weights...
        self._reset_run_state()  # ...unless a checkpoint is restored below
        for cb in trainer.checkpoint_callbacks:
            if _is_lightning(cb, "callbacks", "ModelCheckpoint") and cb.save_weights_only:  # type: ignore[attr-defined]
                rank_zero_warn(
                    "ModelCheckpoint(save_weights_only=True) skips callback hooks, so its checkpoints hold"
                    " the fast weights and cannot resume Lookahead; use save_weights_only=False."
                )

    def _set_up_workers(self, trainer: Trainer) -> None:
        self._workers = None
        if not self.local_sgd:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not local_steps.check_strategy(trainer.strategy, trainer.world_size, scaler):
            self._warn_once("local_sgd", "Lookahead: local_sgd=True in a single process is plain Lookahead.")
            return
        per_worker = self.local_config.ranks_per_worker_for(trainer.num_devices)
        self._workers = local_steps.Workers(per_worker)  # the process groups: a collective, every rank is here
        if self._workers.count == 1:
            self._warn_once(
                "one_worker",
                f"Lookahead: ranks_per_worker={self.ranks_per_worker} makes all {trainer.world_size} ranks one"
                " worker: this is DDP + Lookahead (nothing to average at syncs).",
            )

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Create the slow weights once the strategy has placed, wrapped and restored the model."""
        if self.attached:
            return
        if self._pending is not None and "sharded_path" in self._pending:
            claim: list[str] | None = distributed.saved_names(
                self._pending["sharded_path"], f"state_dict.{FAST_PREFIX}"
            )
        else:
            claim = self._pending["fast"].keys() if self._pending is not None else None
        # phi := the current weights (a checkpoint's slow weights after a restore)
        if self._local_active and trainer.strategy.model is not None:
            local_steps.check_ddp_module(trainer.strategy.model)
        self.lookahead.attach(trainer.optimizers, pl_module, claim)
        if self._averager is not None and trainer.strategy.model is not None:
            self._averager.wrap(trainer.strategy.model)  # the workers' gradient all-reduce
        if self._workers is not None and (note := local_steps.sync_batchnorm_note(pl_module, self._workers)):
            self._warn_once("sync_batchnorm", note)
        self.lookahead.gate = _InTrainerCallbacks(self, trainer)
        # the distance costs extra passes per sync: measure it only where a row will show it. With
        # shards it needs a collective, so there it must not depend on a per-rank logger choice.
        sharded = any(g.any_sharded for g in self.lookahead.groups)
        if self.log_stats and (bool(trainer.loggers) or self.prog_bar or sharded):
            self.lookahead.measure_distance = _RowAhead(self, trainer)
        self._apply_pending(trainer)

    def _apply_pending(self, trainer: Trainer) -> None:
        pending, state = self._pending, self._pending_state
        self._pending = self._pending_state = None
        if pending is not None:
            if "sharded_path" in pending:
                pending = checkpoint_io.load_sharded(self.lookahead, pending["sharded_path"])
            per_rank = pending.get(local_steps.PER_RANK_KEY)
            mine = (
                local_steps.rank_state(per_rank, self._workers, pending.get(local_steps.GROUPING_KEY))
                if self._workers is not None
                else None
            )
            if per_rank and not self._local_active:
                self._warn_once(
                    "per_rank",
                    f"Lookahead: the checkpoint holds the local-SGD state of {len(per_rank)} ranks; this run (one"
                    " process, or local_sgd=False) continues from rank 0's fast weights and optimizer state.",
                )
            if mine is not None:  # local SGD: this rank's own fast weights, buffers and moments, not rank 0's
                pending = {**pending, "fast": mine["fast"], "slow_moments": mine["slow_moments"]}
            self.lookahead.load_tensors(pending)
            if mine is not None:
                local_steps.load_optimizer_states(trainer.optimizers, mine["optimizers"])
                local_steps.load_buffers(self.lookahead.module, mine.get("buffers", {}))
        if state is not None:
            self.lookahead.load_counters(state)
        self._logged_syncs = self.lookahead.syncs + self.lookahead.skipped  # log only syncs from here on
        if self._averager is not None:
            self._averager.start(sum(self.lookahead.steps))  # bytes per step of this fit
        self._published = False

    @property
    def _restore_waiting(self) -> bool:
        """A checkpoint was restored into the running fit and is not applied yet."""
        return self.attached and (self._pending is not None or self._pending_state is not None)

    def _catch_up(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bring Lookahead in line with what the Trainer did since the last hook: a checkpoint
        restored in the middle of fit (the LR finder and batch-size finder roll back their trials
        this way) and optimizers that were re-created."""
        if not self.attached:
            return
        if self._restore_waiting:
            self._restore_attached(trainer, pl_module)
        if self.lookahead.swapped:
            return  # evaluation in progress: the optimizers cannot step now
        if self.lookahead.replace_optimizers(trainer.optimizers):
            self._warn_once(
                "replaced",
                "Lookahead: the Trainer's optimizers were replaced during fit; the slow weights carry over"
                " by parameter name and the step counters by optimizer index.",
            )

    def _restore_attached(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The module's parameters hold the checkpoint's state_dict now, i.e. its slow weights
        # (also when they were swapped in: the loaded values went wherever the parameters point),
        # so this is a resume like any other: start over from them and apply the checkpoint.
        if self._pending is not None and self._pending.get("reset"):  # saved before Lookahead started
            self._pending = self._pending_state = None
        self.lookahead.detach()
        self.lookahead = self._new_core()
        self._eval_swapped = False
        self._attach(trainer, pl_module)

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)
        self._catch_up(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Unpaired eval hooks (an exception caught elsewhere, a custom loop) must never leave
        # the optimizer stepping the slow weights.
        if self.lookahead.swapped:
            self.lookahead.use_fast()
            self._eval_swapped = False
        self._catch_up(trainer, pl_module)
        if self._averager is not None and trainer.strategy.model is not None:  # before every forward: Lightning
            steps = self.lookahead.steps[0] if self.lookahead.steps else 0  # turns it back on under manual
            self._averager.prepare(trainer.strategy.model, steps)  # optimisation

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # optimizers re-created after on_train_batch_start (by a callback listed after this one) are
        # followed before their first step, so that step counts
        self._catch_up(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_stats:
            self._log_syncs(trainer, pl_module)
        self._batches += 1
        every = self.check_ranks_every
        if every is not None and self._batches % (every * self.k * trainer.accumulate_grad_batches) == 0:
            self._check_ranks()

    def _check_ranks(self) -> None:
        self.lookahead.check_ranks()  # at batch counts every rank reaches together

    def _log_syncs(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Straight to the loggers, not LightningModule.log: Lightning re-logs a step metric's last
        # value on every later step of the epoch, which would fake syncs that did not happen.
        # Rows follow the Trainer's cadence (log_every_n_steps) and only when a sync happened
        # since the last row, so nothing is read from the device on other steps.
        la = self.lookahead
        done = la.syncs + la.skipped
        if done != self._logged_syncs and _should_log(trainer):
            la.read_flags()  # device-side skip decisions (CUDA): read at rows, not at syncs
        if not self._published:  # the current count, so monitors find the key before the first row
            self._published = True
            self._to_callback_metrics(trainer, pl_module, {"lookahead/syncs": float(la.syncs)})
        if done == self._logged_syncs or not _should_log(trainer):
            return
        self._logged_syncs = done
        metrics = la.metrics()  # host reads: logger rows only
        if self._averager is not None:
            metrics.update(self._averager.comm_metrics(sum(la.steps)))
        row = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row)
        self._to_callback_metrics(trainer, pl_module, metrics)

    def _to_callback_metrics(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        # Through LightningModule.log with logger=False: into trainer.callback_metrics (and the
        # progress bar), not into logger rows. Re-shown until the next update, which is true here:
        # the count stays current until the next sync, the distance is the latest sync's.
        if trainer.barebones:  # Lightning disables self.log there
            return
        for name, value in metrics.items():
            pl_module.log(name, value, prog_bar=self.prog_bar, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The deployable model from here on: LightningModule.on_train_end, later callbacks (export,
        # save_pretrained, ONNX) and on_fit_end see the slow weights; the fast ones stay in the
        # callback, so a later trainer.save_checkpoint still writes a resumable checkpoint.
        self._catch_up(trainer, pl_module)
        if self.check_ranks_every is not None:
            self._check_ranks()  # every rank reaches the end of training together
        self._warn_if_unsynced("the end of training leaves the initial weights in the module")
        self._finish()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._workers is not None:  # local SGD: unequal epochs would misalign the syncs (or hang)
            local_steps.check_equal_batches(trainer.num_training_batches)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.lookahead.read_flags()  # device-side skip decisions: warned or raised at the latest here

    def _finish(self) -> None:
        self.lookahead.detach()
        self.lookahead.use_slow()
        self.lookahead.release()  # every parameter owns its storage again: nothing of the layout leaks
        self._eval_swapped = False

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resume of a finished run skips the training loop: attach anyway, so the restored fast
        # weights and counters are kept (and written by a later trainer.save_checkpoint).
        if not self.attached and self._pending is not None:
            self._attach(trainer, pl_module)
        self._catch_up(trainer, pl_module)
        self._finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # fit is over (Lightning re-raises, or ends gracefully on Ctrl-C): as after a normal end,
        # the module holds the slow weights and the callback keeps the fast ones for a checkpoint
        self._finish()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.lookahead.detach()

    def _warn_if_unsynced(self, what: str) -> None:
        la = self.lookahead
        if self.attached and la.syncs == 0 and any(la.steps):
            self._warn_once(
                "unsynced",
                f"Lookahead: {what}: only {max(la.steps)} optimizer step(s) ran and the first sync comes after"
                f" k={self.k}, so the slow weights still equal the weights training started from. Runs shorter"
                " than k steps (fast_dev_run, limit_train_batches) evaluate and save those; use a smaller k, or"
                " eval_weights='fast' to validate the fast weights.",
            )

    # ------------------------------------------------------------------ evaluation
    def _begin_eval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Outside fit there is nothing to swap: after a fit the module already holds the slow
        # weights, and after ckpt_path / load_state_dict it holds what the user asked for.
        if trainer.state.fn != "fit":
            return
        self._attach(trainer, pl_module)  # the sanity check runs before on_train_start
        self._catch_up(trainer, pl_module)
        if self.eval_weights == "slow":
            if not trainer.sanity_checking:
                self._warn_if_unsynced("validation evaluates the weights training started from")
            if self.lookahead.use_slow():
                self._eval_swapped = True

    def _end_eval(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._eval_swapped and self._restore_waiting:
            # a checkpoint was restored during the loop: the loaded slow weights went into the
            # swapped-in storage; swapping back would put the stale fast weights over them
            self._restore_attached(trainer, pl_module)
        if self._eval_swapped:
            self.lookahead.use_fast()
            self._eval_swapped = False

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin_eval(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_eval(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin_eval(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_eval(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begin_eval(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_eval(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.attached:
            return self.lookahead.counters()
        return dict(self._pending_state or {})  # restored but not attached yet: keep it in new checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or self._stage != "fit":  # Lightning restores callbacks for validate/test too
            return
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("steps"), list):
            raise ValueError(
                "Lookahead: the checkpoint's LookaheadCallback state is corrupted: expected a dict with a 'steps'"
                f" list (one count per optimizer), 'syncs' and the settings; got {state_dict!r:.200}"
            )
        changed = self.config.changed_from(state_dict)
        if changed and not self.attached:  # a mid-fit restore (a tuner's rollback) is our own state
            outer = "outer momentum buffer" if self.outer_optimizer is None else "outer optimizer's state"
            reset = "" if self.config.same_outer_state(state_dict) else f" (the {outer} starts from zero)"
            rank_zero_warn(
                f"Lookahead: the checkpoint was saved with {changed}; continuing with {self.config.saved()}{reset}."
            )
        self._pending_state = dict(state_dict)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """``state_dict`` gets the slow weights; the fast weights and pullback's moments ride along.

        Three layouts, following the strategy's own: plain tensors (single process, DDP); DTensor
        shards in a distributed checkpoint (ours go into ``state_dict`` under a prefix, so every
        rank writes its own shards); full tensors gathered from shards (a collective, all ranks).
        Parameters without slow weights (frozen, or updated by no optimizer) are saved as they are.
        """
        if not self.attached:
            self._save_unattached(trainer, checkpoint)
            return
        self._catch_up(trainer, pl_module)
        if not trainer.sanity_checking:
            self._warn_if_unsynced("a checkpoint stores the weights training started from as the model")
        checkpoint_io.write(self.lookahead, pl_module, checkpoint, lambda msg: self._warn_once("missing", msg))
        if self._local_active:  # every rank's own fast weights and optimizer state (a collective)
            per_rank = local_steps.gather_rank_states(self.lookahead, trainer.optimizers)
            if per_rank is not None and self._workers is not None:
                checkpoint[CHECKPOINT_KEY][local_steps.PER_RANK_KEY] = per_rank
                checkpoint[CHECKPOINT_KEY][local_steps.GROUPING_KEY] = self._workers.size

    def _save_unattached(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        if self._pending is not None and "fast" in self._pending:
            # restored from a checkpoint whose training loop never ran (a finished run): pass it on
            checkpoint[CHECKPOINT_KEY] = {k: self._pending[k] for k in TENSOR_ENTRIES}
            for key in (local_steps.PER_RANK_KEY, local_steps.GROUPING_KEY):
                if self._pending.get(key):
                    checkpoint[CHECKPOINT_KEY][key] = self._pending[key]
        elif self._stage == "fit":
            # before this fit's first training step (a tuner saving its rollback point): resuming
            # from here starts Lookahead afresh, which is what this marker says
            checkpoint[CHECKPOINT_KEY] = {"layout": NOT_STARTED}
        elif self._dropped:
            self._warn_once(
                "dropped",
                "Lookahead: this checkpoint holds weights loaded after fit (e.g. test(ckpt_path=...)), without"
                " Lookahead's fast weights and counters, which belonged to the replaced weights: fine for"
                " deployment, but fit(ckpt_path=...) from it starts a new Lookahead run.",
            )
        elif self._stage is None:
            # e.g. the main process after strategy="ddp_spawn": fit ran in worker processes, and
            # Lightning copies back only the module's weights (the slow ones)
            self._warn_once(
                "stateless",
                "Lookahead: this process's LookaheadCallback never took part in a fit (with ddp_spawn, fit runs"
                " in worker processes), so this checkpoint holds the module's weights without Lookahead's fast"
                " weights and counters: fine for deployment, but fit(ckpt_path=...) from it starts a new"
                " Lookahead run. Use ModelCheckpoint for resumable checkpoints: it saves inside the workers.",
            )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            # evaluation: checkpoint["state_dict"] already holds the slow weights. It replaced the
            # module's, which were ours after fit: our fast weights and counters belong to other
            # weights now, and a later trainer.save_checkpoint must not pair them with these.
            # Nothing is wrong (fit, then test(ckpt_path="best") is the common flow): say so only
            # if such a checkpoint is saved later, when it matters (_save_unattached).
            if self.attached:
                self.lookahead.detach()
                self.lookahead = self._new_core()
                self._reset_run_state()
                self._dropped = True
            return
        entry = checkpoint_io.checked_entry(checkpoint.get(CHECKPOINT_KEY))
        if entry is None or entry.get("layout") == NOT_STARTED:
            if entry is None and not self.attached:
                rank_zero_warn(
                    "Lookahead: the checkpoint was written without LookaheadCallback; starting with"
                    " slow = fast = the loaded weights."
                )
            # attached: a rollback to weights from before Lookahead started; applied at the next
            # hook (_catch_up), once the module holds them
            self._pending = {"reset": True} if self.attached else None
            self._pending_state = None
        elif entry.get("layout") == "sharded":
            self._pending = {"sharded_path": str(trainer.ckpt_path)}
        else:
            self._pending = {k: entry.get(k, {}) for k in TENSOR_ENTRIES}
            for key in (local_steps.PER_RANK_KEY, local_steps.GROUPING_KEY):
                self._pending[key] = entry.get(key)


class _InTrainerCallbacks:
    """Lookahead's step gate: true while the callback is in ``trainer.callbacks``. Lightning's LR
    and batch-size finders take the callbacks out while their trial loops step the optimizers."""

    def __init__(self, callback: LookaheadCallback, trainer: Trainer) -> None:
        self.callback = callback
        self.trainer: weakref.ref[Trainer] | None = weakref.ref(trainer)

    def __call__(self) -> bool:
        trainer = self.trainer() if self.trainer is not None else None
        return trainer is None or any(c is self.callback for c in trainer.callbacks)  # type: ignore[attr-defined]

    def __getstate__(self) -> dict[str, Any]:  # a weak reference does not pickle; a copy is ungated
        return {"callback": self.callback, "trainer": None}


class _RowAhead:
    """The core's ``measure_distance``: true at a sync whose distance reaches a logger row, i.e.
    when the next row comes before this optimizer's next sync (always under manual optimisation,
    where steps per batch are the module's choice). Depends on counters all ranks share."""

    def __init__(self, callback: LookaheadCallback, trainer: Trainer) -> None:
        self.k = callback.k
        self.trainer: weakref.ref[Trainer] | None = weakref.ref(trainer)

    def __call__(self, index: int) -> bool:
        trainer = self.trainer() if self.trainer is not None else None
        if trainer is None or trainer.fast_dev_run or not trainer.lightning_module.automatic_optimization:  # type: ignore[attr-defined]
            return True
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]
        if every == 0:
            return False
        row = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # the row counter at this batch's end
        first_row = -(-row // every) * every  # the first row at or after this batch
        return first_row < row + self.k  # before the next sync (k steps later) overwrites the stats

    def __getstate__(self) -> dict[str, Any]:  # a weak reference does not pickle; a copy always measures
        return {"k": self.k, "trainer": None}


def _should_log(trainer: Trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers on the batch that just ended
    (its ``_LoggerConnector.should_update_logs``, evaluated in ``on_train_batch_end``)."""
    every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's connectors, undeclared
    if every == 0:
        return False
    loop = trainer.fit_loop
    if loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return False
    step = loop.epoch_loop._batches_that_stepped + 1  # incremented after this hook
    # (not Lightning's `or trainer.should_stop`: one rank may set it alone, and with sharded
    # parameters a row takes a collective that every rank must reach)
    return step % every == 0 or bool(trainer.fast_dev_run)  # type: ignore[attr-defined]


def _is_lightning(obj: object, module: str, *names: str) -> bool:
    """isinstance against Lightning classes of both namespaces (``lightning.pytorch.<module>`` and
    ``pytorch_lightning.<module>``); a namespace that was never imported cannot own ``obj``."""
    for root in ("lightning.pytorch", "pytorch_lightning"):
        if root.split(".")[0] not in sys.modules:
            continue
        try:
            mod = importlib.import_module(f"{root}.{module}")
        except ImportError:  # pragma: no cover - a partial install
            continue
        classes = tuple(c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type))
        if classes and isinstance(obj, classes):
            return True
    return False


def check_strategy(trainer: Trainer) -> None:
    """Refuse strategies whose parameter layout we cannot serve correctly (never run silently wrong)."""
    if _is_lightning(trainer.strategy, "strategies", "FSDPStrategy", "DeepSpeedStrategy"):
        raise ValueError(
            f"LookaheadCallback does not support {type(trainer.strategy).__name__}: its flattened/partitioned"
            " parameters do not match the module's parameter names. Use strategy='ddp' or"
            " ModelParallelStrategy with torch.distributed.fsdp.fully_shard (FSDP2) in configure_model."
        )


distributed_check_strategy = check_strategy  # the name of the first release


def check_callbacks(trainer: Trainer) -> None:
    """Refuse callbacks that also own the module's weights at evaluation, at the end and in checkpoints."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if _is_lightning(cb, "callbacks", "WeightAveraging", "StochasticWeightAveraging"):
            raise ValueError(
                f"LookaheadCallback cannot be combined with {type(cb).__name__}: both swap their own weights"
                " into the module for validation, at the end of fit and in checkpoints, and neither can honour"
                " the other's contract (the module would end with one callback's weights and the checkpoint"
                " with a mix). Use one of them. Lookahead's slow weights are already an average along the"
                " trajectory; to average further, train with Lookahead, then fine-tune from its slow weights"
                f" with {type(cb).__name__} alone."
            )
