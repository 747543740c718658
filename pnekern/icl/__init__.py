"""Synthetic in-context-learning harness: tasks, small models, closed-form baselines, training, evaluation.

Layout (data flows one way; nothing here imports ``pnekern.optim`` at import time):

- :mod:`.tasks` — seeded generators (linear/sparse regression, classification, induction, copy/reverse,
  factual recall) and :func:`make_task`.
- :mod:`.models` — GPT-2-style decoder (:class:`RegressionTransformer`, :class:`SequenceTransformer`) and
  :class:`LinearSelfAttention`.
- :mod:`.baselines` — OLS, ridge, Bayes posterior mean, averaging, k-NN, one-step GD, dMMSE.
- :mod:`.evaluate` — error-vs-k curves, excess error over Bayes, bootstrap CIs, induction scores,
  head knockout, linear probes, recall accuracy.
- :mod:`.train` — :func:`train` with micro-batching, warm-up+cosine LR, matched-loss stopping.
- :mod:`.stats` — Spearman ρ with bootstrap CI, TOST equivalence, Holm–Bonferroni.
- :mod:`.similarity` / :mod:`.layer_causal` — SimAOU / SimAM / SimAMΔ and layer-causal K/V fine-tuning (ZS vs ICL
  vs FT), with random-update and untrained-model controls.
- :mod:`.runs` — :class:`RunConfig`, training with ``pnekern.AdamW`` statistics and a curvature probe,
  evaluation vs baselines, report files and resumable sweeps (behind ``pnekern demo`` / ``pnekern icl``).
"""
from __future__ import annotations

from .baselines import (DMMSE, KNN, OLS, Averaging, BayesPosteriorMean, ICLEstimator, OneStepGD, Ridge,
                        baselines_for_task, line_search_step_size, one_step_gd_optimal_loss,
                        one_step_gd_optimal_step, predict_prefixes)
from .evaluate import (ErrorCurve, bootstrap_ci, error_vs_k, excess_error_over_bayes, head_knockout_effect,
                       induction_score, induction_scores, linear_probe_beta, model_prefix_predictions,
                       prediction_distance, recall_accuracy)
from .models import (GPTBackbone, LinearSelfAttention, RegressionTransformer, SequenceTransformer,
                     TransformerOutput)
from .runs import RunConfig, build_noise_config, evaluate_run, load_run, run_sweep, train_run, write_run_files
from .experiments import ExperimentSpec, analyze_experiment, format_experiment, load_spec, run_experiment
from .stats import SpearmanResult, TOSTResult, holm_bonferroni, spearman_with_ci, tost_two_sample
from .tasks import (IGNORE_INDEX, ClassificationTask, CopyTask, FactualRecallTask, ICLTask, InductionTask,
                    LinearRegressionTask, RegressionBatch, SequenceBatch, SparseRegressionTask, TASK_REGISTRY,
                    make_generator, make_task)
from .train import TrainResult, check_model_task, compute_loss, train, warmup_cosine_factor
from .similarity import AttentionCapture, capture_attention, cosine, sim_am, sim_am_delta, sim_aou
from .layer_causal import (SIMILARITY_METHODS, SimilarityResult, final_loss, finetune_kv, icl_ft_similarity,
                           kv_parameters, layer_causal_loss, layer_outputs, random_kv_update)

__all__ = [
    # tasks
    "IGNORE_INDEX", "ICLTask", "RegressionBatch", "SequenceBatch", "LinearRegressionTask", "SparseRegressionTask",
    "ClassificationTask", "InductionTask", "CopyTask", "FactualRecallTask", "TASK_REGISTRY", "make_task",
    "make_generator",
    # models
    "GPTBackbone", "RegressionTransformer", "SequenceTransformer", "LinearSelfAttention", "TransformerOutput",
    # baselines
    "ICLEstimator", "OLS", "Ridge", "BayesPosteriorMean", "Averaging", "KNN", "OneStepGD", "DMMSE",
    "predict_prefixes", "one_step_gd_optimal_step", "one_step_gd_optimal_loss", "line_search_step_size",
    "baselines_for_task",
    # evaluation
    "ErrorCurve", "error_vs_k", "excess_error_over_bayes", "prediction_distance", "bootstrap_ci",
    "model_prefix_predictions", "induction_score", "induction_scores", "head_knockout_effect",
    "linear_probe_beta", "recall_accuracy",
    # training
    "TrainResult", "train", "compute_loss", "warmup_cosine_factor", "check_model_task",
    # runs
    "RunConfig", "train_run", "evaluate_run", "write_run_files", "load_run", "run_sweep", "build_noise_config",
    # experiment specs (configs/icl_*.json)
    "ExperimentSpec", "load_spec", "run_experiment", "analyze_experiment", "format_experiment",
    # statistics
    "SpearmanResult", "TOSTResult", "spearman_with_ci", "tost_two_sample", "holm_bonferroni",
    # ICL vs GD similarity, layer-causal GD
    "AttentionCapture", "capture_attention", "cosine", "sim_aou", "sim_am", "sim_am_delta",
    "SIMILARITY_METHODS", "SimilarityResult", "icl_ft_similarity", "finetune_kv", "random_kv_update",
    "kv_parameters", "layer_outputs", "layer_causal_loss", "final_loss",
]
