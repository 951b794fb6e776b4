"""Task accuracy with lm-evaluation-harness: any composition as an lm-eval model, registered as `expertkit`.

Importing this package registers the model with lm-eval, so after `import expertkit.tasks`,
`lm_eval.simple_evaluate(model="expertkit", model_args="library=DIR,model=NAME", tasks=[...])` works.
"""

from lm_eval.api.registry import register_model

from expertkit.tasks.lm import ExpertkitLM

register_model("expertkit")(ExpertkitLM)

__all__ = ["ExpertkitLM"]
