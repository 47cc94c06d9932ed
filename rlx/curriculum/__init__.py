"""Which prompts get rollouts and how many: estimators, selectors,
allocators and the controller that runs them (ALGORITHMS.md section C)."""
