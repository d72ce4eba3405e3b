"""Functions the task YAMLs in this folder name with `!function utils.X`.

Prompt functions are lm-eval's own (imported, not copied), so prompts stay identical to the
built-in tasks; only the data source differs (see lm_eval_layers/data.py).
"""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.super_glue.copa.utils import (  # noqa: F401
    doc_to_choice as copa_doc_to_choice,
    doc_to_target as copa_doc_to_target,
    doc_to_text as copa_doc_to_text,
)
from lm_eval.tasks.wikitext.preprocess_wikitext import (  # noqa: F401
    process_results as wikitext_process_results,
    wikitext_detokenizer,
)
from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa: F401
    doc_to_choice as winogrande_doc_to_choice,
    doc_to_target as winogrande_doc_to_target,
    doc_to_text as winogrande_doc_to_text,
)

from lm_eval_layers.task_data import load  # noqa: F401
