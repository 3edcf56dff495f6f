from dlmstudy.analysis.scaling import critical_compute, effective_data, fit_repetition, law_loss, usable_epochs

__all__ = ["critical_compute", "effective_data", "fit_repetition", "law_loss", "usable_epochs"]
