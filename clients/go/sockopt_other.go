//go:build !linux

package tether

import (
	"errors"
	"net"
)

// applySocketOptions sets what the portable API offers: TCP_NODELAY and SO_KEEPALIVE with
// the idle time (Go sets the probe interval to the same value). The probe count and
// TCP_USER_TIMEOUT need Linux; heartbeats and dead-after do not.
func applySocketOptions(c *net.TCPConn, o SocketOptions) error {
	if err := c.SetNoDelay(true); err != nil {
		return err
	}
	if err := c.SetKeepAlive(true); err != nil {
		return err
	}
	return c.SetKeepAlivePeriod(o.KeepaliveIdle)
}

func readSocketOptions(c *net.TCPConn) (SocketOptions, error) {
	return SocketOptions{}, errors.New("tether: reading socket options back needs Linux")
}

func setAbortiveClose(c *net.TCPConn) { _ = c.SetLinger(0) }
