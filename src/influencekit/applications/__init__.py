"""The paper's applications as workflows (explaining predictions; more land with their issues)."""
