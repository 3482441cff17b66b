"""Training: a run's life cycle (run.py: train and TrainingRun), the meta-optimizer
(optim.py), CUDA graphs (capture.py), loss-spike rollback, divergence, learning-rate
schedules, the summary and TensorBoard logging."""
