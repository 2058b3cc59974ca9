from tokenmill.settings import Settings


def test_settings_read_typed_values_from_the_environment():
    settings = Settings.from_env(
        {"TOKENMILL_HTTP_PORT": "9000", "TOKENMILL_CPU_TDP_W": "95.5", "TOKENMILL_REGION": "us"}
    )
    assert settings.http_port == 9000
    assert settings.cpu_tdp_w == 95.5
    assert settings.region == "us"


def test_settings_survive_a_round_trip_through_a_child_environment():
    settings = Settings.from_env({}, database_url="postgresql://x/y", claim_idle_ms=1234)
    assert Settings.from_env(settings.to_env()) == settings
