from tokenmill.inspector.checks import (
    check_empty,
    check_repetition,
    check_truncated,
    inspect_output,
    repeated_fraction,
    verdict,
)


def test_empty_output_is_a_defect():
    assert check_empty("  \n").severity == "defect"
    assert check_empty("Paris.").severity == "ok"


def test_hitting_max_tokens_is_a_warning():
    assert check_truncated("length", 32, 32).severity == "warn"
    assert check_truncated("stop", 10, 32).severity == "ok"


def test_looping_output_is_a_defect():
    looping = "the cat sat on the mat. " * 10
    assert repeated_fraction(looping) > 0.5
    assert check_repetition(looping).severity == "defect"


def test_varied_output_passes_repetition():
    text = (
        "Red, green and blue are the primary colours of light; mixing them in pairs gives "
        "cyan, magenta and yellow, which printers use instead."
    )
    assert check_repetition(text).severity == "ok"


def test_short_output_is_not_judged_for_repetition():
    assert check_repetition("no no no no").severity == "ok"


def test_verdict_takes_the_worst_signal():
    assert verdict(inspect_output("fine answer", "stop", 2, 10)) == "pass"
    assert verdict(inspect_output("fine answer", "length", 10, 10)) == "warn"
    assert verdict(inspect_output("", "length", 10, 10)) == "defective"
