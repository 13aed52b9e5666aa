import os


def pytest_addoption(parser):
    parser.addoption("--soak-steps", type=int, default=None,
                     help="decode steps for tests/soak (default 1000; env KVCOMPACT_SOAK_STEPS)")


def soak_steps(config) -> int:
    return config.getoption("--soak-steps") or int(os.environ.get("KVCOMPACT_SOAK_STEPS", "0")) or 1000
