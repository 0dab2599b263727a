"""The pytest plugin, run as a user runs it: pytester writes a test file into a fresh project and
runs pytest in a subprocess, where the plugin is loaded through its `pytest11` entry point."""

from __future__ import annotations

import textwrap

from tests.helpers import RESIDUAL_MLP

pytest_plugins = ["pytester"]

MODELS = RESIDUAL_MLP + textwrap.dedent('''

    def net(depth):
        torch.manual_seed(0)
        return Net(depth)
''')

TESTS = MODELS + textwrap.dedent('''

    def test_healthy_model(assert_healthy):
        report = assert_healthy(net(1), torch.randn(16, 32))
        assert report.findings == []


    def test_sick_model():
        from healthcheck import assert_healthy

        assert_healthy(net(12), torch.randn(16, 32))
''')


def test_healthy_passes_and_sick_fails_with_findings_and_fixes(pytester):
    pytester.makepyfile(test_models=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*healthcheck: Net is not healthy (fail on error):*",
        "*error*HC101*12 residual join(s)*",
        "*fix: Scale each join by 1/√2*",
        "*FAILED test_models.py::test_sick_model*",
    ])
    assert "Traceback" not in result.stdout.str()  # the findings, not healthcheck's internals


def test_project_config_is_read_from_the_rootdir(pytester):
    # the sick model's errors are HC101, the measured HC201 and the huge output it leads to (HC504):
    # ignoring them lets it pass
    pytester.makepyprojecttoml('[tool.healthcheck]\nignore = ["HC101", "HC2", "HC504"]\n')
    pytester.makepyfile(test_models=TESTS)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_fail_on_and_options_override(pytester):
    pytester.makepyfile(test_models=MODELS + textwrap.dedent('''

        def test_warning_fails_at_warning(assert_healthy):  # structure alone: HC101 is a warning
            assert_healthy(net(3), torch.randn(16, 32), fail_on="warning", probes=False)


        def test_select_limits_the_rules(assert_healthy):
            assert_healthy(net(12), torch.randn(16, 32), select=["HC102"])
    '''))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*warning*HC101*", "*FAILED test_models.py::test_warning_fails_at_warning*"])
