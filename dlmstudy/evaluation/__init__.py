"""Evaluation: likelihoods (exact AR NLL, diffusion ELBO), lm_eval adapters and offline tasks (`harness.run_eval`)."""

from dlmstudy.evaluation.likelihood import ar_nll, mdm_loglikelihood, mdm_nll_bound

__all__ = ["ar_nll", "mdm_loglikelihood", "mdm_nll_bound"]
