//go:build linux

package tether

import (
	"net"
	"syscall"
	"time"
)

// TCP_USER_TIMEOUT (linux/tcp.h); the frozen syscall package does not name it.
const tcpUserTimeout = 0x12

// applySocketOptions sets TCP_NODELAY, SO_KEEPALIVE with idle/interval/count and
// TCP_USER_TIMEOUT on a TCP connection.
func applySocketOptions(c *net.TCPConn, o SocketOptions) error {
	if err := c.SetNoDelay(true); err != nil {
		return err
	}
	if err := c.SetKeepAlive(true); err != nil {
		return err
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = raw.Control(func(fd uintptr) {
		set := func(opt, v int) {
			if serr == nil {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, opt, v)
			}
		}
		set(syscall.TCP_KEEPIDLE, int(o.KeepaliveIdle/time.Second))
		set(syscall.TCP_KEEPINTVL, int(o.KeepaliveInterval/time.Second))
		set(syscall.TCP_KEEPCNT, o.KeepaliveCount)
		set(tcpUserTimeout, int(o.UserTimeout/time.Millisecond))
	})
	if err != nil {
		return err
	}
	return serr
}

// readSocketOptions reads the options back from the kernel (tests).
func readSocketOptions(c *net.TCPConn) (SocketOptions, error) {
	var o SocketOptions
	raw, err := c.SyscallConn()
	if err != nil {
		return o, err
	}
	var gerr error
	err = raw.Control(func(fd uintptr) {
		get := func(opt int) int {
			v, e := syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, opt)
			if gerr == nil {
				gerr = e
			}
			return v
		}
		o.KeepaliveIdle = time.Duration(get(syscall.TCP_KEEPIDLE)) * time.Second
		o.KeepaliveInterval = time.Duration(get(syscall.TCP_KEEPINTVL)) * time.Second
		o.KeepaliveCount = get(syscall.TCP_KEEPCNT)
		o.UserTimeout = time.Duration(get(tcpUserTimeout)) * time.Millisecond
	})
	if err != nil {
		return o, err
	}
	return o, gerr
}

// setAbortiveClose makes the next Close send RST (SO_LINGER 0).
func setAbortiveClose(c *net.TCPConn) { _ = c.SetLinger(0) }
