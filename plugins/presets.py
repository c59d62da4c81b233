"""Presets: ast (the AST paper), ast-reference (the authors' scripts), mtt (MTT as published).

``ast`` follows the paper's Implementation Details, ``ast-reference`` the
authors' published scripts, ``mtt`` MTT's published setting.

A preset names plugins and sets config keys and plugin options; a key the
user sets (a config file, ``--set``) wins over the preset's value. Select one
preset per run: two of them set the same keys differently, which is refused.
Compare them with one command line each::

    for p in ast ast-reference mtt; do astkit run --plugins $p --out runs/$p; done
"""

from astkit import hookimpl

AST = ["smooth-experts", "representative-init", "balanced-inner-loss", "intermediate-matching", "weight-perturbation"]

#: AST (Shen, Yang, Lam, arXiv 2310.10541), Implementation Details; the
#: authors' script values where the paper gives none (expert lr 0.003,
#: weight decay 1e-3, log base 5 for the balanced weight).
AST_PAPER = {
    "description": "the AST paper: the five AST techniques (paper variants: ramp 0.5 -> 1 over 5 epochs, mu 1, "
                   "vartheta 8, rho 0.1), experts SGD momentum 0.9 with the lr halved at half the epochs; "
                   "the authors' scripts where the paper is silent (expert lr 0.003, weight decay 1e-3, log base 5)",
    "config": {
        "experts": {"optimizer": "sgd", "lr": 0.003, "momentum": 0.9, "weight_decay": 1e-3,
                    "lr_decay": 0.5, "lr_decay_fraction": 0.5, "reset_optimizer_on_decay": False},
    },
    "options": {
        "smooth-experts": {"variant": "paper"},
        "representative-init": {"variant": "paper"},
        "balanced-inner-loss": {"variant": "paper", "base": 5.0},
        "intermediate-matching": {"beta": "equal"},
        "weight-perturbation": {"variant": "paper"},
    },
}

#: The authors' published scripts (buffer.py, distill.py), as METHOD.md
#: sections 1 and 7 read them; evaluation as in their code except that the
#: final accuracy is reported (report_max stays false).
AST_REFERENCE = {
    "description": "the AST authors' published scripts: experts SGD lr 0.003 momentum 0.9 weight decay 1e-3, "
                   "lr x0.6 once after epoch T//2+1 with the optimiser rebuilt; the code variants of the five "
                   "techniques (ramp 0.50..0.95 over 10 epochs, per-pixel penalty x2 on clean images, log base 5, "
                   "element-wise perturbation, K-Means on logits); student momentum 0.9; evaluation weight decay "
                   "1e-3, lr x0.5 and momentum 0.8 after E//2+1, final accuracy reported",
    "config": {
        "experts": {"optimizer": "sgd", "lr": 0.003, "momentum": 0.9, "weight_decay": 1e-3,
                    "lr_decay": 0.6, "reset_optimizer_on_decay": True},
        "distill": {"student_momentum": 0.9},
        "evaluate": {"weight_decay": 1e-3, "lr_decay": 0.5, "momentum_after_decay": 0.8, "report_max": False},
    },
    "options": {
        "smooth-experts": {"variant": "reference"},
        "representative-init": {"variant": "reference"},
        "balanced-inner-loss": {"variant": "reference"},
        "intermediate-matching": {"beta": "equal"},
        "weight-perturbation": {"variant": "reference"},
    },
}

#: MTT (Cazenavette et al., CVPR 2022) as published: no stage-2 technique,
#: experts trained with plain SGD.
MTT = {
    "description": "MTT's published setting: no AST technique; experts plain SGD lr 0.01, momentum 0, "
                   "weight decay 0, no lr decay",
    "config": {
        "experts": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "lr_decay": 1.0},
    },
    "options": {},
}


@hookimpl
def astkit_register_presets(register):
    register("ast", AST, AST_PAPER["description"], config=AST_PAPER["config"], options=AST_PAPER["options"])
    register("ast-reference", AST, AST_REFERENCE["description"], config=AST_REFERENCE["config"],
             options=AST_REFERENCE["options"])
    register("mtt", [], MTT["description"], config=MTT["config"], options=MTT["options"])
