//! The Kubernetes manifests (`deploy/kubernetes`), checked against the binary they run.
//!
//! Every overlay is rendered with the pinned `kubectl kustomize` of `scripts/k8s-tools.sh`
//! (`.cache/k8s`) and every object is validated, strictly and offline, against the Kubernetes
//! schemas (`kubernetes-validate`); only the CRDs listed in [`CRD_KINDS`] have no schema there,
//! and their wiring is asserted here instead. The wiring that matters is checked against the
//! real `lumen` binary: the container args are flags it accepts (`lumen ARGS --help` exits 0)
//! and the env vars are ones its `--help` names; container ports are the ports those flags
//! set; the head started with the manifest's args and the ConfigMap's serve config answers the
//! probe paths (never 404) and lists the config's applications; the workers' `HEAD_ADDRESS` is
//! the head Service's gRPC port; the join token comes from one Secret key on both sides; GPU
//! workers request one GPU on the Karpenter pool (a split 70B replica's worker, as many as its
//! ranks, on nodes that have them); KEDA and the monitors select what exists;
//! Open WebUI points at the API Service's port 8000; and the cpu-demo serve config really
//! serves a chat (`lumen serve --config`), exporting the metrics the autoscaler queries.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{Lumen, head_flags, model_path};

const OVERLAYS: &[&str] = &["cpu-demo", "gpu-a10g", "gpu-70b-tp8"];
/// Custom resources the manifests use, which no Kubernetes schema covers.
const CRD_KINDS: &[&str] = &["ServiceMonitor", "PodMonitor", "ScaledObject", "NodePool", "EC2NodeClass"];
/// The Kubernetes release the objects are validated against (EKS' oldest in standard support).
const KUBERNETES_VERSION: &str = "1.31.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> PathBuf {
    let path = root().join(".cache/k8s/bin").join(name);
    assert!(path.exists(), "{} is missing: run scripts/k8s-tools.sh first", path.display());
    path
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// One overlay rendered: the YAML kustomize printed and its objects.
struct Rendered {
    _dir: tempfile::TempDir,
    yaml: PathBuf,
    objects: Vec<Value>,
}

/// Renders an overlay from a copy of `deploy/kubernetes`, where each overlay's `secrets.env`
/// (kept out of git) is made from its `secrets.env.example`, as the docs tell users to (an
/// overlay built on another reads that one's).
fn render(overlay: &str) -> Rendered {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("kubernetes");
    copy_tree(&root().join("deploy/kubernetes"), &tree);
    for entry in std::fs::read_dir(tree.join("overlays")).expect("overlays") {
        let each = entry.expect("overlay").path();
        if each.join("secrets.env.example").exists() && !each.join("secrets.env").exists() {
            std::fs::copy(each.join("secrets.env.example"), each.join("secrets.env")).expect("secrets.env");
        }
    }
    let overlay_dir = tree.join("overlays").join(overlay);
    let yaml_text = run(Command::new(tool("kubectl")).arg("kustomize").arg(&overlay_dir));
    let yaml = dir.path().join(format!("{overlay}.yaml"));
    std::fs::write(&yaml, &yaml_text).expect("write rendering");
    let script =
        "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let json = run(Command::new(tool("python")).args(["-c", script]).arg(&yaml));
    let objects: Vec<Value> = serde_json::from_str(&json).expect("rendered objects");
    Rendered { _dir: dir, yaml, objects }
}

impl Rendered {
    fn find(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
    }

    /// A generated object (ConfigMap, Secret), whose name kustomize suffixes with a hash.
    fn generated(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| {
                o["kind"] == kind && o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with(&format!("{name}-")))
            })
            .unwrap_or_else(|| panic!("no generated {kind} {name}-* in the rendering"))
    }

    fn container(&self, deployment: &str, name: &str) -> &Value {
        containers(self.find("Deployment", deployment)).find(|c| c["name"] == name).expect("container")
    }

    /// The Services whose selector picks the pods of `deployment`.
    fn services_of(&self, deployment: &str) -> Vec<&Value> {
        let labels = &self.find("Deployment", deployment)["spec"]["template"]["metadata"]["labels"];
        self.objects.iter().filter(|o| o["kind"] == "Service" && selects(&o["spec"]["selector"], labels)).collect()
    }

    /// The head's container port that `http://SERVICE:PORT[/path]` reaches, and that Service
    /// (which must select the head's pods).
    fn head_port_behind(&self, url: &str) -> (&Value, u64) {
        let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("{url} is not http://"));
        let authority = rest.split('/').next().unwrap_or(rest);
        let (service, port) = authority.split_once(':').unwrap_or_else(|| panic!("{url} has no port"));
        let port: u64 = port.parse().unwrap_or_else(|_| panic!("{url}: bad port"));
        let svc = self.services_of("lumen-head").into_iter().find(|s| s["metadata"]["name"] == service);
        let svc = svc.unwrap_or_else(|| panic!("{url}: {service} is not a Service of the head"));
        let ports = svc["spec"]["ports"].as_array().expect("ports");
        let svc_port = ports.iter().find(|p| p["port"] == port).unwrap_or_else(|| panic!("{url}: no port {port}"));
        (svc, resolve_port(self.container("lumen-head", "head"), &svc_port["targetPort"]))
    }

    /// The serve config in the head's ConfigMap.
    fn serve_config(&self) -> String {
        let map = self.generated("ConfigMap", "lumen-serve-config");
        map["data"]["serve.yaml"].as_str().expect("serve.yaml in the ConfigMap").to_string()
    }
}

fn containers(deployment: &Value) -> impl Iterator<Item = &Value> {
    deployment["spec"]["template"]["spec"]["containers"].as_array().expect("containers").iter()
}

fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_object() else { return false };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
}

fn args(container: &Value) -> Vec<String> {
    container["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect()
}

/// The value of `--flag=value` in a container's args.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().find_map(|a| a.strip_prefix(&format!("{name}=")).map(str::to_string))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)
}

fn env_value(container: &Value, name: &str) -> String {
    env(container, name).and_then(|e| e["value"].as_str()).unwrap_or_else(|| panic!("env {name}")).to_string()
}

/// A named container port's number.
fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container port {name}"))
}

/// The container port a probe or Service port (a number or a port name) reaches.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    port.as_u64().unwrap_or_else(|| container_port(container, port.as_str().expect("port name")))
}

fn lumen(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lumen")).args(args).output().expect("running lumen")
}

/// Checks that the binary accepts a container's args and knows its `LUMEN_*` / `HEAD_ADDRESS`
/// environment variables.
fn assert_binary_accepts(container: &Value) {
    let mut with_help = args(container);
    with_help.push("--help".into());
    let out = lumen(&with_help);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lumen rejects {with_help:?}: {}", String::from_utf8_lossy(&out.stderr));
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name");
        if name.starts_with("LUMEN_") || name == "HEAD_ADDRESS" {
            let known = help.contains(&format!("env: {name}=")) || help.contains(&format!("env: {name}]"));
            assert!(known, "`lumen {}` has no flag read from {name}", args(container)[0]);
        }
    }
}

fn int(value: &Value) -> u64 {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("{value} is not a count"))
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        let out = Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .arg(&rendered.yaml)
            .output()
            .expect("kubernetes-validate");
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{overlay} does not validate:\n{report}");
        for line in report.lines().filter(|l| l.starts_with("WARN")) {
            assert!(CRD_KINDS.iter().any(|k| line.contains(&format!("kind {k} "))), "{overlay}: {line}");
        }
        let validated = report.lines().filter(|l| l.contains(" passed for resource ")).count();
        let crds = rendered.objects.iter().filter(|o| CRD_KINDS.iter().any(|k| o["kind"] == *k)).count();
        assert_eq!(validated + crds, rendered.objects.len(), "{overlay}: every object is validated:\n{report}");
        for o in &rendered.objects {
            let namespaced = !matches!(o["kind"].as_str(), Some("Namespace" | "NodePool" | "EC2NodeClass"));
            assert!(
                !namespaced || o["metadata"]["namespace"] == "lumen",
                "{overlay}: {} outside lumen",
                o["metadata"]["name"]
            );
        }
    }
}

#[tokio::test]
async fn the_head_runs_with_the_manifest_args_and_answers_its_probes() {
    let http = reqwest::Client::new();
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        let head = rendered.container("lumen-head", "head");
        assert_binary_accepts(head);
        let args = args(head);
        assert_eq!(args[0], "head");
        for (name, flag_name) in [("http", "--port"), ("dashboard", "--dashboard-port"), ("grpc", "--grpc-port")] {
            let port = flag(&args, flag_name).unwrap_or_else(|| panic!("{overlay}: the head sets {flag_name}"));
            assert_eq!(container_port(head, name).to_string(), port, "{overlay}: port {name} is {flag_name}");
        }
        // The config file is the ConfigMap's serve.yaml, mounted where --config points.
        let config_path = flag(&args, "--config").expect("--config");
        let mount = head["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap_or("-")));
        let volume_name = mount.expect("--config is on a mounted volume")["name"].clone();
        let volumes = &rendered.find("Deployment", "lumen-head")["spec"]["template"]["spec"]["volumes"];
        let volume = volumes.as_array().expect("volumes").iter().find(|v| v["name"] == volume_name).expect("volume");
        let map = rendered.generated("ConfigMap", "lumen-serve-config");
        assert_eq!(
            volume["configMap"]["name"], map["metadata"]["name"],
            "{overlay}: the config volume is the ConfigMap"
        );
        assert!(config_path.ends_with("/serve.yaml"));
        let state_dir = flag(&args, "--state-dir").expect("--state-dir");
        let state =
            head["volumeMounts"].as_array().expect("mounts").iter().find(|m| m["mountPath"] == state_dir.as_str());
        let state_volume =
            volumes.as_array().expect("volumes").iter().find(|v| v["name"] == state.expect("state mount")["name"]);
        let claim = state_volume.expect("state volume")["persistentVolumeClaim"]["claimName"]
            .as_str()
            .expect("a PVC for --state-dir");
        rendered.find("PersistentVolumeClaim", claim);

        // Start the head as deployed (ports and paths made local) with the ConfigMap's config.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("serve.yaml"), rendered.serve_config()).expect("serve.yaml");
        let local = ["--host", "--port", "--dashboard-port", "--grpc-port", "--config", "--state-dir"];
        let mut run_args: Vec<String> =
            args.iter().filter(|a| !local.iter().any(|f| a.starts_with(&format!("{f}=")))).cloned().collect();
        run_args.extend(head_flags());
        run_args.extend(["--config".into(), dir.path().join("serve.yaml").display().to_string()]);
        run_args.extend(["--state-dir".into(), dir.path().join("state").display().to_string()]);
        let process = Lumen::start(&run_args);
        for (probe, listener) in [("readinessProbe", "api"), ("livenessProbe", "dashboard")] {
            let get = &head[probe]["httpGet"];
            let port = resolve_port(head, &get["port"]);
            let expected = if listener == "api" { "--port" } else { "--dashboard-port" };
            assert_eq!(Some(port.to_string()), flag(&args, expected), "{overlay}: {probe} targets {expected}");
            let url = format!("{}{}", process.url(listener), get["path"].as_str().expect("path"));
            let status = http.get(&url).send().await.expect("probe").status().as_u16();
            assert!(status == 200 || status == 503, "{overlay}: {probe} {url} answered {status}");
        }
        let liveness =
            format!("{}{}", process.url("dashboard"), head["livenessProbe"]["httpGet"]["path"].as_str().unwrap_or(""));
        assert_eq!(http.get(&liveness).send().await.expect("liveness").status(), 200, "a live head passes liveness");
        let status: Value = http
            .get(format!("{}/api/serve/applications/", process.url("dashboard")))
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        let applications = status["applications"].as_object().expect("applications");
        assert!(!applications.is_empty(), "{overlay}: the serve config deploys applications: {status}");
        assert!(
            dir.path().join("state/serve-config.json").exists(),
            "{overlay}: the config is persisted in --state-dir"
        );
    }
}

/// Every key of each deployment's `model:` section is an option Lumen reads (an engine flag of
/// `lumen serve --help`, or one of the head-side keys): a misspelt setting would otherwise be
/// silently ignored.
#[test]
fn every_model_setting_in_the_serve_configs_is_read_by_lumen() {
    let help = String::from_utf8_lossy(&lumen(&["serve".into(), "--help".into()]).stdout).into_owned();
    let mut head_side = vec!["source", "served_model_name"];
    head_side.extend_from_slice(lumen_head::config::model::HEAD_OPTIONS);
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        let config: Value = serde_json::to_value(
            lumen_head::config::ServeConfig::from_yaml(&rendered.serve_config()).expect("the serve config parses"),
        )
        .expect("json");
        for app in config["applications"].as_array().expect("applications") {
            for d in app["deployments"].as_array().expect("deployments") {
                for key in d["model"].as_object().expect("model section").keys() {
                    let flag = format!("--{} ", key.replace('_', "-"));
                    assert!(
                        head_side.contains(&key.as_str()) || help.contains(&flag),
                        "{overlay}: model.{key} is not a Lumen option"
                    );
                }
            }
        }
    }
}

#[test]
fn workers_join_the_head_service_with_the_secret_token() {
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        let worker = rendered.container("lumen-worker", "worker");
        let head = rendered.container("lumen-head", "head");
        assert_binary_accepts(worker);
        let worker_args = args(worker);
        assert_eq!(worker_args[0], "worker");

        // HEAD_ADDRESS = http://<a Service of the head>:<its port reaching the head's gRPC>.
        let address = env_value(worker, "HEAD_ADDRESS");
        let (svc, reached) = rendered.head_port_behind(&address);
        let grpc = flag(&args(head), "--grpc-port").expect("--grpc-port");
        assert_eq!(reached.to_string(), grpc, "{overlay}: {address} reaches the head's gRPC");
        assert_eq!(
            svc["spec"]["publishNotReadyAddresses"], true,
            "{overlay}: workers reach a head that is not ready yet"
        );

        // The head dials the worker back on its own gRPC port; metrics on the named port.
        let advertise = env_value(worker, "LUMEN_ADVERTISE_ADDRESS");
        assert!(advertise.ends_with(&format!(":{}", flag(&worker_args, "--port").expect("--port"))), "{advertise}");
        assert_eq!(container_port(worker, "grpc").to_string(), flag(&worker_args, "--port").unwrap_or_default());
        assert_eq!(
            container_port(worker, "metrics").to_string(),
            flag(&worker_args, "--metrics-port").unwrap_or_default()
        );

        // One Secret key holds the join token for both.
        let token =
            |c: &Value| env(c, "LUMEN_JOIN_TOKEN").expect("LUMEN_JOIN_TOKEN")["valueFrom"]["secretKeyRef"].clone();
        assert_eq!(token(worker), token(head), "{overlay}: head and workers share the join token");
        let secret = rendered.generated("Secret", "lumen-secrets");
        assert_eq!(token(worker)["name"], secret["metadata"]["name"]);
        assert!(secret["data"].get(token(worker)["key"].as_str().expect("key")).is_some(), "the Secret has the key");

        // Drains end before the kill, and last as long as the longest generation.
        for (deployment, container) in [("lumen-worker", worker), ("lumen-head", head)] {
            let grace = int(
                &rendered.find("Deployment", deployment)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            );
            let drain = int(&Value::String(env_value(container, "LUMEN_DRAIN_TIMEOUT_S")));
            assert!(grace > drain, "{overlay}: {deployment} is killed ({grace} s) before its drain ends ({drain} s)");
        }
        let config = lumen_head::config::ServeConfig::from_yaml(&rendered.serve_config()).expect("serve config");
        let longest = config
            .applications
            .iter()
            .flat_map(|a| &a.deployments)
            .filter_map(|d| d.graceful_shutdown_timeout_s)
            .fold(0.0, f64::max);
        let drain: f64 = env_value(worker, "LUMEN_DRAIN_TIMEOUT_S").parse().expect("drain");
        assert!(drain >= longest, "{overlay}: workers drain {drain} s, deployments want {longest} s");
        assert!(worker["lifecycle"]["preStop"].is_object(), "{overlay}: workers drain in preStop");

        // Prometheus scrapes the workers' metrics port and the head Service.
        let pod_monitor = rendered.find("PodMonitor", "lumen-worker");
        let labels = &rendered.find("Deployment", "lumen-worker")["spec"]["template"]["metadata"]["labels"];
        assert!(selects(&pod_monitor["spec"]["selector"]["matchLabels"], labels));
        assert_eq!(pod_monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
        let monitor = rendered.find("ServiceMonitor", "lumen-head");
        let monitored: Vec<_> = rendered
            .services_of("lumen-head")
            .into_iter()
            .filter(|s| selects(&monitor["spec"]["selector"]["matchLabels"], &s["metadata"]["labels"]))
            .collect();
        let scraped = monitor["spec"]["endpoints"][0]["port"].clone();
        assert!(
            monitored
                .iter()
                .any(|s| s["spec"]["ports"].as_array().is_some_and(|ps| ps.iter().any(|p| p["name"] == scraped))),
            "{overlay}: the ServiceMonitor scrapes a head Service port"
        );
    }
}

#[test]
fn gpu_workers_request_one_gpu_on_the_karpenter_pool_and_scale_with_keda() {
    let cpu = render("cpu-demo");
    let worker = cpu.container("lumen-worker", "worker");
    assert!(worker["resources"]["limits"].get("nvidia.com/gpu").is_none(), "the CPU demo needs no GPU");

    let gpu = render("gpu-a10g");
    let worker = gpu.container("lumen-worker", "worker");
    for side in ["requests", "limits"] {
        assert_eq!(int(&worker["resources"][side]["nvidia.com/gpu"]), 1, "one GPU per worker ({side})");
    }
    let pod = &gpu.find("Deployment", "lumen-worker")["spec"]["template"]["spec"];
    let pool = gpu.find("NodePool", "lumen-g5-gpu");
    assert_eq!(pod["nodeSelector"]["karpenter.sh/nodepool"], pool["metadata"]["name"], "workers land on the GPU pool");
    for taint in pool["spec"]["template"]["spec"]["taints"].as_array().expect("taints") {
        let tolerated = pod["tolerations"].as_array().expect("tolerations").iter().any(|t| {
            t["key"] == taint["key"]
                && t["effect"] == taint["effect"]
                && (t["operator"] == "Exists" || t["value"] == taint["value"])
        });
        assert!(tolerated, "workers tolerate {taint}");
    }
    let class = &pool["spec"]["template"]["spec"]["nodeClassRef"];
    gpu.find(class["kind"].as_str().expect("kind"), class["name"].as_str().expect("name"));
    let families = pool["spec"]["template"]["spec"]["requirements"].as_array().expect("requirements");
    assert!(families.iter().any(|r| r["key"] == "karpenter.k8s.aws/instance-family" && r["values"][0] == "g5"));

    let config = lumen_head::config::ServeConfig::from_yaml(&gpu.serve_config()).expect("serve config");
    let deployment = &config.applications[0].deployments[0];
    assert_eq!(deployment.gpus_per_replica(), 1.0, "a replica takes the worker's one GPU");
    assert_eq!(deployment.model.get("device").and_then(Value::as_str), Some("cuda"));

    let scaled = gpu.find("ScaledObject", "lumen-worker");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "lumen-worker");
    gpu.find("Deployment", scaled["spec"]["scaleTargetRef"]["name"].as_str().expect("target"));
    let max_replicas = deployment.autoscaling_config.as_ref().expect("autoscaling").max_replicas;
    assert_eq!(int(&scaled["spec"]["maxReplicaCount"]), u64::from(max_replicas), "a worker per replica at most");
    let queries: Vec<&str> = scaled["spec"]["triggers"]
        .as_array()
        .expect("triggers")
        .iter()
        .filter_map(|t| t["metadata"]["query"].as_str())
        .collect();
    assert!(queries.iter().any(|q| q.contains("vllm:num_requests_waiting")), "{queries:?}");
    assert!(queries.iter().any(|q| q.contains("vllm:kv_cache_usage_perc")), "{queries:?}");
}

/// The 70B overlay splits one replica over a node's eight GPUs: the worker asks Kubernetes for
/// as many GPUs as the serve config's replica asks the head for (its bundles), which is the
/// model's `tensor_parallel_size`, on a pool of nodes that have that many; KEDA stops at the
/// serve config's replicas; the model divides over the ranks.
#[test]
fn the_70b_overlay_splits_a_replica_over_a_nodes_eight_gpus() {
    let tp = render("gpu-70b-tp8");
    let config = lumen_head::config::ServeConfig::from_yaml(&tp.serve_config()).expect("serve config");
    let deployment = &config.applications[0].deployments[0];
    let ranks = deployment.model.get("tensor_parallel_size").and_then(Value::as_u64).expect("tensor_parallel_size");
    assert_eq!(ranks, 8);
    assert_eq!(deployment.gpus_per_replica(), ranks as f64, "one bundle GPU per rank");
    assert_eq!(deployment.model.get("device").and_then(Value::as_str), Some("cuda"));
    let worker = tp.container("lumen-worker", "worker");
    for side in ["requests", "limits"] {
        assert_eq!(
            int(&worker["resources"][side]["nvidia.com/gpu"]),
            ranks,
            "a worker holds a replica's GPUs ({side})"
        );
    }
    let a10g = render("gpu-a10g");
    assert_eq!(worker["image"], a10g.container("lumen-worker", "worker")["image"], "the CUDA image");
    let pool = tp.find("NodePool", "lumen-g5-gpu");
    let requirements = pool["spec"]["template"]["spec"]["requirements"].as_array().expect("requirements");
    let sizes =
        requirements.iter().find(|r| r["key"] == "karpenter.k8s.aws/instance-size").expect("instance sizes")["values"]
            .as_array()
            .expect("values");
    // g5.48xlarge is the g5 with eight A10Gs; the pool takes no smaller node.
    assert_eq!(sizes, &vec![Value::from("48xlarge")]);
    assert!(requirements.iter().any(|r| r["key"] == "karpenter.k8s.aws/instance-family" && r["values"][0] == "g5"));
    let max_replicas = deployment.autoscaling_config.as_ref().expect("autoscaling").max_replicas;
    let scaled = tp.find("ScaledObject", "lumen-worker");
    assert_eq!(int(&scaled["spec"]["maxReplicaCount"]), u64::from(max_replicas), "a worker per replica at most");
    assert!(
        int(&pool["spec"]["limits"]["nvidia.com/gpu"]) >= u64::from(max_replicas) * ranks,
        "the pool can hold every replica's GPUs"
    );
    // The model's shape divides: DeepSeek-R1-Distill-Llama-70B has 64 query heads, 8 KV heads,
    // an intermediate size of 28672 and 128256 tokens (its config.json).
    for (what, size) in [("heads", 64u64), ("KV heads", 8), ("intermediate", 28672), ("vocabulary", 128256)] {
        assert_eq!(size % ranks, 0, "{what} {size} divides over {ranks} ranks");
    }
    assert_eq!((28672 / ranks) % 32, 0, "each rank's MLP rows are whole blocks");
}

#[test]
fn open_webui_points_at_the_api_service_and_keeps_its_data() {
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        let ui = rendered.container("open-webui", "open-webui");
        let base = env_value(ui, "OPENAI_API_BASE_URLS");
        assert!(base.ends_with("/v1"), "{overlay}: {base} is an OpenAI base URL");
        let head = rendered.container("lumen-head", "head");
        let (_, target) = rendered.head_port_behind(&base);
        assert_eq!(
            Some(target.to_string()),
            flag(&args(head), "--port"),
            "{overlay}: Open WebUI reaches the OpenAI API"
        );
        assert_eq!(target, 8000);
        let data = env_value(ui, "DATA_DIR");
        let mount = ui["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["mountPath"] == data.as_str())
            .expect("data mount");
        let volumes = &rendered.find("Deployment", "open-webui")["spec"]["template"]["spec"]["volumes"];
        let volume = volumes.as_array().expect("volumes").iter().find(|v| v["name"] == mount["name"]).expect("volume");
        rendered.find(
            "PersistentVolumeClaim",
            volume["persistentVolumeClaim"]["claimName"].as_str().expect("a PVC for chat history"),
        );
    }
}

/// The cpu-demo's serve config, with its model path pointed at the local copy, serves a chat
/// through `lumen serve`, and the head then exports every metric the GPU overlay's KEDA
/// triggers query.
#[tokio::test]
async fn the_cpu_demo_serve_config_serves_a_chat_and_exports_the_scaling_metrics() {
    let rendered = render("cpu-demo");
    let config = rendered.serve_config();
    let config = config.replace("/models/SmolLM2-135M-Instruct.Q4_1.gguf", &model_path());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("serve.yaml");
    std::fs::write(&path, &config).expect("write");
    let parsed = lumen_head::config::ServeConfig::from_yaml(&config).expect("parses");
    let model = parsed.applications[0].deployments[0].served_model_name().expect("served_model_name").to_string();

    let mut serve_args = vec!["serve".to_string(), "--config".into(), path.display().to_string()];
    serve_args.extend(head_flags());
    let process = Lumen::start(&serve_args);
    let http = reqwest::Client::new();
    process.wait_healthy(&http).await;
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
                           "temperature": 0});
    let response =
        http.post(format!("{}/v1/chat/completions", process.url("api"))).json(&body).send().await.expect("chat");
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    assert!(answer["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{answer}");

    let metrics =
        http.get(format!("{}/metrics", process.url("api"))).send().await.expect("metrics").text().await.expect("text");
    let gpu = render("gpu-a10g");
    let scaled = gpu.find("ScaledObject", "lumen-worker");
    for trigger in scaled["spec"]["triggers"].as_array().expect("triggers") {
        let query = trigger["metadata"]["query"].as_str().expect("query");
        for name in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.starts_with("vllm:"))
        {
            assert!(metrics.lines().any(|l| l.starts_with(&format!("{name}{{"))), "Lumen exports no {name}");
        }
    }
}
