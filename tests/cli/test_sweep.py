"""`moequant sweep`: bad arguments are one line."""

from moequant.cli.main import main


def test_bad_arguments(capsys):
    assert main(["sweep", "--methods", "planned,magic"]) == 2
    assert "unknown sweep method 'magic'" in capsys.readouterr().err
    assert main(["sweep", "--bits", "3,x"]) == 2
    assert "--bits takes numbers" in capsys.readouterr().err
