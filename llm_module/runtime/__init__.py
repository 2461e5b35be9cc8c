"""What llm_module changes in a served model (prepare.py) and the CPU kernels it runs them with."""
