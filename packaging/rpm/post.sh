# mvps %post: the state directory; enables and starts nothing (set the JWT secret in
# /etc/mvps/mvps-te.env, then systemctl enable --now mvps-te). An upgrade ($1 = 2) never
# restarts a running mvps-te, which would drop every NBD connection: the admin does.
if [ ! -d /var/lib/mvps ]; then
	install -d -o mvps -g mvps -m 0750 /var/lib/mvps
fi
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 2 ] && systemctl is-active --quiet mvps-te.service; then
		echo "mvps: mvps-te.service still runs the previous version;" \
			"restart it when convenient: systemctl restart mvps-te"
	fi
fi
exit 0
