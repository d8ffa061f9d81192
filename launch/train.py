"""Train a policy with any registered algorithm: ``python launch/train.py --help``.

A thin script over :func:`skyrl_fn.cli.main`; a custom entry point registers its algorithm
(``skyrl_fn.compat.register_advantage_estimator``) and then calls ``main()`` the same way.
"""

from skyrl_fn.cli import main

if __name__ == "__main__":
    main()
