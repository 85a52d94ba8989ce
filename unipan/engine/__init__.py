"""Training engine: loop, schedules, checkpoints with exact resume, DDP, metrics, evaluation.

- `trainer.train(cfg, resume=...)`: the training loop (1 process or `torchrun --nproc_per_node N`).
- `evaluator.evaluate(model, dataset, meta, device)`: in-memory PQ (+ mIoU), distributed-aware.
- `checkpoint`: atomic save, `torch.load(weights_only=True)` load with clear mismatch errors.
- `schedule`: SGD and warmup step/poly schedules; `sampler`: the resumable data order.
- `distributed`: process-group helpers; `metrics`: JSON lines, TensorBoard, loss curve, logs.

Import the submodules directly; this package imports nothing so that `unipan.engine.checkpoint`
stays cheap to import for inference code.
"""
