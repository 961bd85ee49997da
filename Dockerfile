# regmirror's container image: the statically linked binary, the system's
# root certificates (for upstream TLS) and the default config, on scratch.
# Nothing else is in it (no shell, no libc, no package manager), and no base
# image is pulled, so it builds offline.
#
# The build context is a directory holding exactly those three files, made
# from a static build (a static-pie: glibc linked in, so it runs without one):
#
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release --locked --target x86_64-unknown-linux-gnu
#   mkdir -p target/image
#   cp target/x86_64-unknown-linux-gnu/release/regmirror \
#      /etc/ssl/certs/ca-certificates.crt config.toml target/image/
#   buildah bud -t regmirror -f Dockerfile target/image
#   # or: docker build -t regmirror -f Dockerfile target/image
#
# tests/deploy.rs builds it the same way and runs `regmirror check` inside it.
#
# Run it: the config's relative paths ("certs", "data") land in the working
# directory, so one volume keeps the CA and the cache:
#
#   docker run -d -p 443:443 -p 5000:5000 -v regmirror:/var/lib/regmirror regmirror
#
# Any subcommand in place of `serve`, e.g. `ca export --config
# /etc/regmirror/config.toml`. deploy/kubernetes/ mounts its own config at
# /etc/regmirror/config.toml.
FROM scratch

COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY config.toml /etc/regmirror/config.toml
COPY regmirror /usr/bin/regmirror

WORKDIR /var/lib/regmirror
# 443: TLS for the intercepted registry names; 5000: plain HTTP (mirror
# mode, /ca.crt, /metrics, /healthz, /readyz).
EXPOSE 443 5000
ENTRYPOINT ["/usr/bin/regmirror"]
CMD ["serve", "--config", "/etc/regmirror/config.toml"]
